"""Split GGUFs as llama.cpp's gguf-split writes them (`model-00001-of-00003.gguf`, metadata
`split.no` / `split.count` / `split.tensors.count`): the converter reads every part, and the
result equals the unsplit file's, tensor by tensor."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgert.convert.gguf_reader import open_gguf, read_gguf
from edgert.errors import EdgertError
from testdata import data_file


@pytest.fixture(scope="module")
def split_smollm(smollm_gguf, tmp_path_factory) -> Path:
    """SmolLM2's GGUF split by llama.cpp's llama-gguf-split into parts of 100 tensors; the
    first part's path."""
    out = tmp_path_factory.mktemp("split")
    tool = data_file("llama.cpp/bin/llama-gguf-split")
    p = subprocess.run([str(tool), "--split", "--split-max-tensors", "100", str(smollm_gguf),
                        str(out / "SmolLM2")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    parts = sorted(out.glob("*.gguf"))
    assert [x.name for x in parts] == [f"SmolLM2-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    return parts[0]


def test_gguf_split_wrote_what_gguf_py_reads_as_parts(split_smollm, smollm_gguf):
    """The oracle's own view: every part carries the split keys; the first holds the rest."""
    parts = sorted(split_smollm.parent.glob("*.gguf"))
    readers = [gguf.GGUFReader(p) for p in parts]
    whole = gguf.GGUFReader(smollm_gguf)
    for i, r in enumerate(readers):
        assert r.fields["split.no"].contents() == i
        assert r.fields["split.count"].contents() == 3
        assert r.fields["split.tensors.count"].contents() == len(whole.tensors)
    assert "general.architecture" in readers[0].fields
    assert "general.architecture" not in readers[1].fields
    assert sum(len(r.tensors) for r in readers) == len(whole.tensors)


def test_a_split_gguf_reads_as_the_unsplit_file(split_smollm, smollm_gguf):
    reader = open_gguf(split_smollm)
    whole = gguf.GGUFReader(smollm_gguf)
    assert [t.name for t in reader.tensors] == [t.name for t in whole.tensors]
    for a, b in zip(reader.tensors, whole.tensors):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    split, unsplit = read_gguf(split_smollm), read_gguf(smollm_gguf)
    assert split.config == unsplit.config
    assert split.tokenizer_files == unsplit.tokenizer_files
    assert split.tensor_count == unsplit.tensor_count
    for i, (a, b) in enumerate(zip(split.tensors(), unsplit.tensors())):
        assert (a.name, a.source_name, a.mapping) == (b.name, b.source_name, b.mapping)
        if i % 7 == 0:  # the values of a sample (all of them take a while to map)
            va, vb = a.value, b.value
            if hasattr(va, "w_q"):
                assert (va.bits, va.group_size) == (vb.bits, vb.group_size)
                va, vb = (va.w_q, va.scales, va.biases), (vb.w_q, vb.scales, vb.biases)
            else:
                va, vb = (va,), (vb,)
            assert all(np.array_equal(x, y) for x, y in zip(va, vb)), a.name


def test_split_parts_missing_or_given_out_of_order_are_one_line_errors(split_smollm, tmp_path):
    parts = sorted(split_smollm.parent.glob("*.gguf"))
    with pytest.raises(EdgertError, match="give the first part .*00001-of-00003") as e:
        open_gguf(parts[1])
    assert "\n" not in str(e.value)
    for p in parts[:2]:  # the first two parts without the third
        (tmp_path / p.name).symlink_to(p)
    with pytest.raises(EdgertError, match="part 3 of 3 .* missing .*SmolLM2-00003-of-00003"):
        open_gguf(tmp_path / parts[0].name)
    (tmp_path / parts[2].name).symlink_to(parts[1])  # the wrong file under the third's name
    with pytest.raises(EdgertError, match="not part 3 of 3"):
        open_gguf(tmp_path / parts[0].name)
