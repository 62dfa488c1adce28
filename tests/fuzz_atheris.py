"""atheris target for the packed-file loader (``make fuzz``; issue 12): coverage-guided runs of
hours where ``tests/test_pack_fuzz.py`` runs seconds.

Each input picks a seed file (see :mod:`fuzz_packed`) and either applies one of its seeded
mutations, replaces the qdistill JSON header with fuzzer-made text, or is taken as the whole
file. Loading must end in a model that runs or in FileFormatError; anything else (another
exception, a hang past ``-timeout``, memory past ``-rss_limit_mb``, a signal) is a finding.

    make fuzz FUZZ_SECONDS=3600
    python tests/fuzz_atheris.py -max_total_time=600 -rss_limit_mb=4096 -timeout=20
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["qdistill.pack", "qdistill.formats"]):
    import qdistill.pack  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_packed  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="qdistill-fuzz-"))
SEEDS = [
    (Path(m["file"]).read_bytes(), m["ref"]) for m in fuzz_packed.make_seeds(WORK)
]  # fmt: skip


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    seed, ref = SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:
        case = fuzz_packed.mutate(seed, fdp.ConsumeInt(4))
    elif mode == 1:
        index, body = fuzz_packed.split_file(seed)
        index["__metadata__"] = {"qdistill": fdp.ConsumeUnicodeNoSurrogates(4096)}
        case = fuzz_packed.join_file(index, body)
    else:
        case = fdp.ConsumeBytes(1 << 16)
    result = fuzz_packed.run_case(case, ref, WORK)
    if result.startswith("other"):
        raise AssertionError(result)


def main() -> None:
    signal.signal(signal.SIGALRM, fuzz_packed._alarm)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
