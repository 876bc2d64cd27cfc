"""The docs point at things that exist: README.md and docs/*.md.

- Every relative markdown link ``[text](target)`` resolves to a file or folder of the repository,
  and its ``#anchor``, when given, to a heading of the target page (GitHub's heading ids).
- Every repository path the docs name in code (inline backticks and fenced blocks), such as
  ``detector/losses/focal.py``, ``configs/losses/ghm.yaml`` or ``scripts/slurm/train.sbatch``,
  exists (a glob matches at least one file), except the files a guide tells the reader to create:
  a fenced block whose first line is ``# <path>``.
- Every ``python -m detector.X`` module the docs name exists.
- README.md stays short: at most 250 lines.
"""

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
# A repository path in code: it starts with a tracked top-level folder (or is a top-level file) and is
# not the tail of a longer path (runs/detector/... is a run folder, not the package).
TOP = r"(?:detector|configs|scripts|benchmarks|tests|docs|\.ci|\.github)/[\w.*/-]*|train\.py|pyproject\.toml|README\.md"
PATH = re.compile(rf"(?<![\w./~<>-])(?:{TOP})")
FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", flags=re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"(`+)(.+?)\1", flags=re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
MODULE = re.compile(r"python -m (detector(?:\.\w+)*+)(?!\.?…)")  # "python -m detector.…" names no module
GENERATED = {".ci/.venv"}  # made by .ci/run, never committed


def split_code(text: str) -> tuple[str, list[str]]:
    """``(prose, code)``: the text with its fenced blocks blanked out, and the fenced blocks' bodies."""
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text), blocks


def slug(heading: str) -> str:
    """GitHub's id of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps unicode letters and digits, as GitHub does
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading id of a markdown page, duplicates numbered ``-1``, ``-2``, … as GitHub does."""
    prose, _ = split_code(page.read_text())
    seen: Counter[str] = Counter()
    ids = set()
    for m in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", prose, flags=re.MULTILINE):
        base = slug(m.group(1))
        ids.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return ids


def created_files(pages: list[Path]) -> set[str]:
    """Paths the guides tell the reader to write: first lines ``# <path>`` of fenced blocks."""
    found = set()
    for page in pages:
        for block in split_code(page.read_text())[1]:
            m = re.fullmatch(r"#\s+([\w./-]+\.\w+)", block.split("\n", 1)[0].strip())
            if m:
                found.add(m.group(1))
    return found


def code_spans(text: str) -> list[str]:
    """Inline code spans and fenced blocks of a page."""
    prose, blocks = split_code(text)
    return [m.group(2) for m in INLINE.finditer(prose)] + blocks


def missing_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file or ``#anchor`` does not exist."""
    prose, _ = split_code(page.read_text())
    prose = INLINE.sub("", prose)  # a link written inside backticks is an example, not a link
    bad = []
    for target in (m.group(1) for m in LINK.finditer(prose)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists() or ROOT not in path.parents and path != ROOT:
            bad.append(f"{target} (no such file)")
        elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
            bad.append(f"{target} (no heading #{anchor} in {path.relative_to(ROOT)})")
    return bad


def missing_paths(page: Path, created: set[str]) -> list[str]:
    """Repository paths named in the code of ``page`` that do not exist."""
    bad = []
    for span in code_spans(page.read_text()):
        for raw in PATH.findall(span):
            path = raw.rstrip(".,:;")
            if "…" in path or path in created or path in GENERATED:
                continue
            if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
                bad.append(path)
    return sorted(set(bad))


def missing_modules(page: Path) -> list[str]:
    """``python -m detector.X`` modules of ``page`` that are neither ``X.py`` nor a package."""
    bad = []
    for name in set(MODULE.findall(page.read_text())):
        base = ROOT.joinpath(*name.split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            bad.append(name)
    return sorted(bad)


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_resolve(page: Path) -> None:
    assert missing_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_paths_and_modules_exist(page: Path) -> None:
    assert missing_paths(page, created_files(PAGES)) == []
    assert missing_modules(page) == []


def test_readme_is_short() -> None:
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it at most {README_MAX_LINES}, move the rest to docs/"


def test_the_checks_find_what_they_should(tmp_path: Path) -> None:
    """The helpers on a made-up page: GitHub heading ids, links, paths, created files and modules."""
    assert slug("Weights & Biases: what a run shows") == "weights--biases-what-a-run-shows"
    assert slug("Corrupt JPEG data: `verify: decode`") == "corrupt-jpeg-data-verify-decode"
    assert slug("ISR-N's candidate cap") == "isr-ns-candidate-cap"
    page = ROOT / "docs" / "_test_docs_probe.md"
    text = (
        "# Probe\n\n## Same\n\n## Same\n\n"
        "[ok](losses.md#normalisers) [self](#same-1) [bad](losses.md#nope) [gone](nope.md) [web](https://x.org)\n"
        "`[not a link](nope.md)` `configs/losses/ghm.yaml` `configs/losses/nope.yaml` `configs/losses/*.yaml`\n"
        "`runs/detector/x/last.ckpt` `detector/losses/poly.py` `python -m detector.ablate` `python -m detector.nope`\n"
        "`python -m detector.…` `python -m detector.models.darknet_weights export`\n"
        "```python\n# detector/losses/poly.py\n```\n```bash\n# (not a heading)\npython scripts/nope.sh\n```\n"
    )
    try:
        page.write_text(text)
        assert anchors(page) == {"probe", "same", "same-1"}
        assert missing_links(page) == ["losses.md#nope (no heading #nope in docs/losses.md)", "nope.md (no such file)"]
        assert created_files([page]) == {"detector/losses/poly.py"}
        assert missing_paths(page, created_files([page])) == ["configs/losses/nope.yaml", "scripts/nope.sh"]
        assert missing_modules(page) == ["detector.nope"]
    finally:
        page.unlink()
