"""Model classes: model ``Foo`` is class ``Foo`` in ``recbole_llm/model/foo.py``."""
