"""README.md as written: its runnable blocks run, its commands parse, and every relative
link of README.md and docs/*.md resolves (to a file, and to a heading where it names one).

A block is runnable when the line before its fence is `<!-- runnable -->` (run with bash in
the project root; it must leave no file in the checkout) or `<!-- runnable: scratch -->`
(run in an empty folder of its own, for a block that writes a run directory).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MNIST_DIR, ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```")
MARKER = re.compile(r"^<!-- runnable(?:: (scratch))? -->$")
# A block that trains, starts Ray or exports is slow; `data` and `--help` are not.
SLOW = re.compile(r"mnist-dist\s+(train|pipeline|export|report|baseline|bench)\b|jobs/pipeline\.sh")
# Checkout paths a command may touch without leaving anything of its own.
NOT_OURS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build"}


def code_blocks(text: str, language: str | None = None) -> list[tuple[str | None, str, int]]:
    """(marker line or None, body, line number of the opening fence) of every fenced block
    (of one language, if given)."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start, j = i, i + 1
            while j < len(lines) and not FENCE.match(lines[j]):
                j += 1
            marker = lines[start - 1] if start and MARKER.match(lines[start - 1]) else None
            if language is None or lines[start][3:].strip() == language:
                blocks.append((marker, "\n".join(lines[start + 1:j]), start + 1))
            i = j + 1
        else:
            i += 1
    return blocks


def runnable_blocks() -> list:
    params = []
    for marker, body, line in code_blocks(README.read_text()):
        if marker is None:
            continue
        assert README.read_text().splitlines()[line - 1] == "```bash", f"README.md:{line}: a runnable block is bash"
        scratch = MARKER.match(marker).group(1) == "scratch"
        marks = [pytest.mark.slow] if SLOW.search(body) else []
        params.append(pytest.param(body, scratch, id=f"README.md:{line}", marks=marks))
    return params


def user_env() -> dict[str, str]:
    """A user's shell after set-up: the venv's bin first on PATH, MNIST where conftest found it."""
    bins = [str(ROOT / ".venv" / "bin"), str(Path(sys.executable).parent)]
    path = os.pathsep.join([*bins, os.environ.get("PATH", "")])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PATH": path, "MNIST_DATA_DIR": str(MNIST_DIR)}


def checkout_files() -> set[str]:
    found = set()
    for directory, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in NOT_OURS and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(directory, f), ROOT) for f in files)
    return found


def test_the_readme_marks_runnable_blocks():
    blocks = runnable_blocks()
    assert any(not p.values[1] for p in blocks), "no <!-- runnable --> block in README.md"
    assert all(p.values[0].strip() for p in blocks), "an empty runnable block"


@pytest.mark.parametrize("body, scratch", runnable_blocks())
def test_a_runnable_readme_block_runs_as_written(body, scratch, tmp_path, mnist_dir):
    before = checkout_files()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", body], capture_output=True, text=True, env=user_env(), check=False,
                          cwd=tmp_path if scratch else ROOT, timeout=300)
    assert proc.returncode == 0, f"$ {body}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    left = sorted(checkout_files() - before)
    assert not left, f"the block left files in the checkout: {left[:5]}"


# ---------------------------------------------------------------- commands as written
def parser_choices(parser) -> dict:
    import argparse

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def readme_commands() -> list[list[str]]:
    """Every `mnist-dist ...` and `bash jobs/pipeline.sh ...` command in README.md's code blocks, as argv."""
    commands = []
    for _, body, _ in code_blocks(README.read_text(), "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0]
            for part in re.split(r"&&|;|\|", line):
                words = shlex.split(part)
                for i, word in enumerate(words):
                    if word.endswith("mnist-dist") and word.split("/")[-1] == "mnist-dist":
                        commands.append(words[i + 1:])
                    elif word == "jobs/pipeline.sh":  # it runs `mnist-dist pipeline ARGS`
                        commands.append(["pipeline", *words[i + 1:]])
    return commands


def test_every_mnist_dist_command_in_the_readme_parses():
    from mnist_dist.cli import build_parser

    commands = readme_commands()
    assert ["pipeline", "--name", "first"] in commands  # the main job (and tests/test_install.py's recipe)
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 0, f"`mnist-dist {shlex.join(argv)}` does not parse"


def test_the_commands_table_names_only_real_flags():
    from mnist_dist.cli import build_parser

    text = README.read_text()
    table = text[text.index("## Commands at a glance"):]
    table = table[:table.index("\n## ", 1)]
    commands = parser_choices(build_parser())
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert {row.split("`")[1].split()[0] for row in rows} == set(commands), "the table should list every command"
    for row in rows:
        name = row.split("`")[1].split()[0]
        flags = set(re.findall(r"--[a-z][a-z0-9-]*", row.split(" | ")[-1]))
        subparsers = [commands[name]]
        if name == "bench":
            subparsers = list(parser_choices(commands[name]).values())
        known = {option for p in subparsers for action in p._actions for option in action.option_strings}
        assert flags <= known, f"{name}: {sorted(flags - known)} are not flags of `mnist-dist {name}`"


def test_the_readme_keeps_the_test_command_and_the_offline_recipe():
    text = README.read_text()
    assert "```bash\n.venv/bin/python -m pytest\n```" in text  # .ci/run runs the README's test command
    assert '-m "not slow"' in text
    assert "export MNIST_DATA_DIR=../shared/data/mnist" in text  # tests/test_install.py runs this recipe
    assert "mnist-dist pipeline --name first" in text


def test_the_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 200, "README.md is the entrance; depth goes to docs/"


# ---------------------------------------------------------------- links
def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub gives a page: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)  # links in code are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    broken = []
    for link in links:
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target})")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{link} (no heading #{fragment} in {target.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_pages_are_linked_from_the_readme():
    links = {link.partition("#")[0] for link in relative_links(README)}
    for page in PAGES[1:]:
        assert page.relative_to(ROOT).as_posix() in links, f"README.md does not link {page.name}"
    assert {"export/README.md", "k8s/README.md"} <= links


# Measured figures live in docs/benchmarks.md only; the other pages link there.
FIGURE = re.compile(r"\d[\d,.]*\s?(?:img/s|ms\b|µs|us\b)|\b9\d\.\d+%|\d\.\d+x\b|\d+(?:\.\d+)? s (?:wall|of training|outside)|\d\.\d+ pp\b")


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "benchmarks.md"], ids=lambda p: p.name)
def test_measured_figures_live_in_benchmarks_only(page):
    text = re.sub(r"\]\([^)]*\)", "]", page.read_text())  # not in link targets
    found = FIGURE.findall(text)
    assert not found, f"{page.relative_to(ROOT)} has measured figures {found[:5]}; move them to docs/benchmarks.md"


# In code, comments say why; figures and history go to docs/benchmarks.md and docs/design.md.
CODE_FIGURE = re.compile(FIGURE.pattern + r"|\b\d+(?:\.\d+)?(?:-\d+)?%|\d+ min\b|\d+(?:\.\d+)? s (?:on|per|a)\b")
SOURCES = sorted([*(ROOT / "mnist_dist").rglob("*.py"), *(ROOT / "export" / "mnist_edge").rglob("*.py")])


def comments_and_docstrings(path):
    import io
    import tokenize

    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.COMMENT or (token.type == tokenize.STRING and token.string.lstrip("rbuf").startswith(('"""', "'''"))):
            yield token.start[0], token.string


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_comments_carry_no_measured_figures(source):
    found = [(line, hit) for line, text in comments_and_docstrings(source) for hit in CODE_FIGURE.findall(text)]
    assert not found, f"{source.relative_to(ROOT)} has figures in comments {found[:5]}; move them to docs/benchmarks.md"
