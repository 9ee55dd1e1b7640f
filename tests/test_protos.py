"""The committed gRPC code in specdec/v1 is what protos/ generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path):
    protos = sorted((ROOT / "protos").rglob("*.proto"))
    assert protos
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", *map(str, protos)],
        check=True,
    )  # fmt: skip
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert len(generated) == 3 * len(protos)
    for path in generated:
        committed = ROOT / path
        assert committed.is_file(), f"{path} is not committed; run scripts/gen_protos.sh"
        assert committed.read_bytes() == (tmp_path / path).read_bytes(), f"{path} is stale; run scripts/gen_protos.sh"
