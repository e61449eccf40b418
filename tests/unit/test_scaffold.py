"""core/config/scaffold.py's pure parts: reading the guide's blocks, renaming the example, choosing a port."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config.scaffold import GUIDE, blocks, camel, example_files, free_port, main, renamed, scaffold, write

MARKDOWN = """Intro.

```python file=pkg/a.py
print("sentiment")
```

```bash run
echo hi
```

```yaml
not: a file
```
"""


def test_blocks_keep_language_attributes_and_line() -> None:
    found = blocks(MARKDOWN)
    assert [(b.language, b.file, b.runnable, b.line) for b in found] == [
        ("python", "pkg/a.py", False, 3), ("bash", None, True, 7), ("yaml", None, False, 11)]
    assert found[0].body == 'print("sentiment")\n'


def test_a_file_written_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"pkg/a\.py is written twice"):
        example_files(MARKDOWN + MARKDOWN)


@pytest.mark.parametrize(("name", "expected"), [("review_tagger", "ReviewTagger"), ("ner", "Ner")])
def test_camel(name: str, expected: str) -> None:
    assert camel(name) == expected


def test_renamed_replaces_the_name_the_class_the_route_and_the_port_only() -> None:
    text = ("class SentimentService: name = 'sentiment'  # models/sentiment/ on 8010, not 80100 or 18010\n"
            "aliases: [sentiment-en]; POST /v1/classify; client.post('/classify'); a classifier; /v1/classifyx")
    assert renamed(text, "review_tagger", 8123) == (
        "class ReviewTaggerService: name = 'review_tagger'  # models/review_tagger/ on 8123, not 80100 or 18010\n"
        "aliases: [review_tagger-en]; POST /v1/review_tagger; client.post('/review_tagger'); a classifier; "
        "/v1/classifyx")


def test_trailing_comments_keep_their_column_after_renaming() -> None:
    text = ("    endpoint: /v1/classify       # requests without a model\n"
            "    aliases: [sentiment-en]      # other names\n"
            "    a_key_naming_sentiment: x  # tight already: two spaces at least\n")
    assert renamed(text, "review_tagger", 8123) == (
        "    endpoint: /v1/review_tagger  # requests without a model\n"
        "    aliases: [review_tagger-en]  # other names\n"
        "    a_key_naming_review_tagger: x  # tight already: two spaces at least\n")
    assert renamed(text, "ner", 8123).splitlines()[1] == "    aliases: [ner-en]            # other names"


def test_the_serving_port_can_move_off_9000() -> None:
    files = scaffold("ner", 8123, GUIDE.read_text(), serve_port=9100)
    assert "\n  port: 9100\n" in files["models/ner/models.yaml"]
    assert not any("9000" in text for text in files.values())


def test_the_guide_holds_every_file_the_scaffold_writes() -> None:
    files = scaffold("review_tagger", 8123, GUIDE.read_text())
    assert sorted(files) == [
        "models/review_tagger/__init__.py", "models/review_tagger/models.yaml",
        "models/review_tagger/requirements.txt", "models/review_tagger/server.py", "models/review_tagger/tiny.py",
        "tests/integration/test_review_tagger_routing.py", "tests/models/test_review_tagger.py"]
    assert not any("sentiment" in text.lower() or "8010" in text or "/classify" in text for text in files.values())


def test_the_longest_name_keeps_every_python_line_within_the_line_length() -> None:
    files = scaffold("n" * 24, 65535, GUIDE.read_text())
    long = [(path, number) for path, text in files.items() if path.endswith(".py")
            for number, line in enumerate(text.splitlines(), 1) if len(line) > 120]
    assert not long, long


def test_free_port_skips_every_port_a_profile_uses(tmp_path: Path) -> None:
    (tmp_path / "model-orchestrator").mkdir()
    (tmp_path / "models" / "x").mkdir(parents=True)
    profile = "settings:\n  port: 9000\nmodels:\n  a:\n    port: 8010\n"
    (tmp_path / "model-orchestrator" / "models.yaml").write_text(profile)
    (tmp_path / "models" / "x" / "models.yaml").write_text("models:\n  x:\n    port: 8011\n")
    assert free_port(tmp_path) == 8012


def test_write_never_overwrites_without_force(tmp_path: Path) -> None:
    write(tmp_path, {"a/b.py": "one"})
    with pytest.raises(FileExistsError, match=r"a/b\.py"):
        write(tmp_path, {"a/b.py": "two"})
    assert (tmp_path / "a" / "b.py").read_text() == "one"
    write(tmp_path, {"a/b.py": "two"}, force=True)
    assert (tmp_path / "a" / "b.py").read_text() == "two"


@pytest.mark.parametrize("name", ["Bad", "1st", "with-dash", "x", "sentiment", "n" * 25])
def test_names_that_are_not_package_names_are_refused(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--root", "/nonexistent"])
    assert exit_info.value.code == 2
    assert "NAME must be" in capsys.readouterr().err
