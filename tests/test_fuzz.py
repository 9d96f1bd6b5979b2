"""Property-based fuzzing (hypothesis) of the GGUF reader, the safetensors reader and the package
loader, bounded in the suite; tests/fuzz_readers.py runs longer. Every input either reads or is
refused with a one-line EdgertError. The corpus of cases found so far (tests/fuzz_corpus/)
is replayed as regression tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing

EXAMPLES = 40  # per reader: a few seconds each here; the script runs thousands

values = st.one_of(st.integers(-2, 1 << 63), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=4), st.none(), st.booleans(),
                   st.lists(st.integers(-2, 100), max_size=3),
                   st.fixed_dictionaries({"rope_type": st.sampled_from(["linear", "llama3",
                                                                        "yarn", "default"])},
                                         optional={"factor": st.floats(allow_nan=True)}))


def flips(kind: str):
    return st.lists(st.tuples(st.integers(0, fuzzing.HEADER_BYTES[kind] - 1),
                              st.integers(0, 255)).map(list), min_size=1, max_size=8)


def mutations(kind: str):
    byte_level = st.fixed_dictionaries({"flips": flips(kind)},
                                       optional={"truncate": st.integers(0, 1 << 16)})
    if kind == "gguf":
        return byte_level
    config = st.fixed_dictionaries({"config": st.dictionaries(
        st.sampled_from(fuzzing.CONFIG_KEYS), values, min_size=1, max_size=3)})
    return st.one_of(byte_level, config)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    return fuzzing.make_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.mark.parametrize("kind", fuzzing.KINDS)
def test_seed_reads(seeds, kind):
    """The unmutated seeds read: the fuzzing starts from inputs that work."""
    assert fuzzing.outcome(kind, fuzzing.apply(kind, seeds[kind], {}, seeds[kind].parent /
                                               f"plain-{kind}")) == "ok"


def _fuzz(kind: str):
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(mutation=mutations(kind))
    def check(seeds, tmp_path, mutation):
        path = fuzzing.apply(kind, seeds[kind], mutation, tmp_path / "work")
        assert fuzzing.outcome(kind, path) in ("ok", "refused")

    return check


test_fuzz_gguf_reader = _fuzz("gguf")
test_fuzz_safetensors_reader = _fuzz("safetensors")
test_fuzz_package_loader = _fuzz("package")


@pytest.mark.parametrize("kind,name,mutation", [
    (kind, name, m) for kind in fuzzing.KINDS for name, m in fuzzing.corpus(kind)])
def test_corpus_case_is_refused_cleanly(seeds, tmp_path, kind, name, mutation):
    """Each case a fuzz run once found (tests/fuzz_corpus/) now reads or is refused."""
    path = fuzzing.apply(kind, seeds[kind], mutation, tmp_path / "work")
    assert fuzzing.outcome(kind, path) in ("ok", "refused"), mutation["note"]
