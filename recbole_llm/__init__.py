"""recbole_llm: LLM-for-recommendation methods as first-class RecBole models.

Public entry points live in :mod:`recbole_llm.quick_start`; model, trainer and dataset resolution
(plugin first, RecBole second) in :mod:`recbole_llm.utils`.
"""
import warnings
from pathlib import Path

# RecBole 1.2.1 on pandas 2.2 / torch 2.13 emits FutureWarnings on every run (chained fillna,
# torch.cuda.amp); they concern RecBole's code, not the user's, and drown the logs.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole(\.|$)")

__version__ = "0.1.0"

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(top_level_name: str, packaged_name: str) -> Path:
    """Folder shipped with the plugin: the repository's top-level copy in a source checkout, the
    packaged copy (``recbole_llm/<packaged_name>``) in a wheel install."""
    checkout = _PACKAGE_DIR.parent / top_level_name
    if checkout.is_dir():
        return checkout
    return _PACKAGE_DIR / packaged_name


PROPERTIES_DIR = resource_dir("properties", "properties")
SHIPPED_DATASETS_DIR = resource_dir("dataset", "shipped_datasets")
