"""On transformers releases without the 5.x GGUF reader (e.g. 4.56, the lowest declared), GGUF
export is refused in one line instead of writing a file whose tokenizer reads back differently."""
import pytest

from deltatune.app.gguf_export import has_gguf_reader, write_gguf
from deltatune.core.delta import DeltaError

from conftest import tiny_llama


@pytest.mark.skipif(has_gguf_reader(), reason="transformers >= 5: export supported (tests/test_export_gguf.py)")
def test_gguf_export_is_refused_without_the_v5_reader(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(DeltaError, match="transformers' GGUF reader of transformers >= 5"):
        write_gguf(tiny_llama(), None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
