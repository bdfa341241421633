"""Regenerate completions/ from the app (tests/test_cli.py fails when they drift)."""

from pathlib import Path

from cxrdiff.cli import completion_script

out = Path(__file__).resolve().parent.parent / "completions"
out.mkdir(exist_ok=True)
for shell in ("bash", "zsh", "fish"):
    (out / f"cxrdiff.{shell}").write_text(completion_script(shell))
    print(out / f"cxrdiff.{shell}")
