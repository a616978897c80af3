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
