"""The README's "Use" example runs as written (it used names it never defined)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_use_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use"):]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (Use)", "exec"), namespace)  # noqa: S102 (the example)
    assert namespace["y"].shape == namespace["x"].shape
