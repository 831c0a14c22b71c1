"""Auto-download through the plugin, against a loopback HTTP server serving a fixture zip.

RecBole 1.2.1 crashes after downloading (torch.distributed.barrier() in a single process) and leaves
a half-made folder behind when a download fails; both are fixed in recbole_llm/data/dataset.py.
"""
import functools
import http.server
import threading
import zipfile

import pytest

from recbole_llm import SHIPPED_DATASETS_DIR
from recbole_llm.config import Config
from recbole_llm.utils import create_dataset


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    sample = SHIPPED_DATASETS_DIR / "amazon-beauty-sample"
    with zipfile.ZipFile(root / "Amazon_Beauty.zip", "w") as archive:
        for suffix in ("inter", "item"):
            archive.write(sample / f"amazon-beauty-sample.{suffix}", f"Amazon_Beauty.{suffix}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _config(tmp_path, url):
    return Config(model="BPR", dataset="amazon-beauty", config_dict={
        "data_path": str(tmp_path / "data"), "download_url": url, "state": "ERROR"})


def test_missing_dataset_is_downloaded_renamed_and_loaded(tmp_path, server):
    dataset = create_dataset(_config(tmp_path, f"{server}/Amazon_Beauty.zip"))
    folder = tmp_path / "data" / "amazon-beauty"
    assert sorted(p.name for p in folder.iterdir()) == ["amazon-beauty.inter", "amazon-beauty.item"]
    assert dataset.inter_num > 0 and "brand" in dataset.field2type
    # second run: no download needed
    assert create_dataset(_config(tmp_path, "http://127.0.0.1:9/unreachable.zip")).inter_num == dataset.inter_num


def test_failed_download_leaves_no_folder_and_can_be_retried(tmp_path, server):
    with pytest.raises(Exception):
        create_dataset(_config(tmp_path, f"{server}/missing.zip"))
    assert not (tmp_path / "data" / "amazon-beauty").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []
    assert create_dataset(_config(tmp_path, f"{server}/Amazon_Beauty.zip")).inter_num > 0
