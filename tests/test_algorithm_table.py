"""The README's algorithm table (tools/algorithm_table.py): current, complete, and built correctly."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("algorithm_table", ROOT / "tools" / "algorithm_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def test_readme_table_is_up_to_date():
    message = tool.check_readme(ROOT / "README.md")
    assert message is None, message


def test_every_algorithm_has_paper_reference_and_a_marked_invariant_test():
    problems = tool.metadata_problems()
    assert not problems, "\n".join(problems)


SYNTHETIC = """
import pytest
from pytest import mark

pytestmark = [pytest.mark.algorithm("alpha"), pytest.mark.slow]


@pytest.mark.algorithm("beta")
def test_decorated():
    pass


@pytest.mark.algorithm("beta", "gamma")
@pytest.mark.parametrize("x", [1, 2, 3])
def test_parametrised(x):
    pass


def test_module_mark_only():
    pass


@pytest.mark.algorithm("delta")
class TestGroup:
    @mark.algorithm("gamma")
    def test_method(self):
        pass

    def helper(self):
        pass


@pytest.mark.algorithm("epsilon")
def helper_not_collected():
    pass
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_marked_tests_are_counted_from_the_ast(tmp_path):
    first = _write(tmp_path / "tests" / "test_first.py", SYNTHETIC)
    second = _write(
        tmp_path / "tests" / "sub" / "test_second.py",
        """
        import pytest

        pytestmark = pytest.mark.algorithm("alpha")


        def test_one():
            pass
        """,
    )
    _write(tmp_path / "tests" / "helpers.py", '@pytest.mark.algorithm("alpha")\ndef test_x(): pass\n')

    tests = tool.collect_marked_tests(tmp_path / "tests")
    names = {(t.path.name, t.name): set(t.algorithms) for t in tests}
    assert names == {
        ("test_first.py", "test_decorated"): {"alpha", "beta"},
        ("test_first.py", "test_parametrised"): {"alpha", "beta", "gamma"},
        ("test_first.py", "test_module_mark_only"): {"alpha"},
        ("test_first.py", "TestGroup::test_method"): {"alpha", "delta", "gamma"},
        ("test_second.py", "test_one"): {"alpha"},
    }
    by_name = tool.tests_by_algorithm(tests)
    counts = {name: len(found) for name, found in by_name.items()}
    assert counts == {"alpha": 5, "beta": 2, "gamma": 2, "delta": 1}  # parametrised: once; helper: 0
    assert {t.path for t in by_name["alpha"]} == {first, second}
    assert {t.path for t in by_name["beta"]} == {first}


def test_a_mark_that_is_not_string_literals_is_an_error(tmp_path):
    path = _write(
        tmp_path / "tests" / "test_dynamic.py",
        """
        import pytest
        NAMES = ["erm"]


        @pytest.mark.algorithm(*NAMES)
        def test_x():
            pass
        """,
    )
    with pytest.raises(tool.TableError, match=r"test_dynamic\.py:6: .*string literals"):
        tool.marked_tests_in_file(path)


def test_table_rows_order_backbone_and_tests_column(tmp_path):
    class Need:
        family = "a ViT"

    class Newer:
        paper = "A, B, Title, ICLR 2024, arXiv:2401.00001"
        reference = "owner/repo@abc1234 src/algo.py:Newer"
        backbone_need = Need()

    class Old:
        paper = "C, Title, ICML 2019, arXiv:1901.00001"
        reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:Old"
        backbone_need = None

    class Base:
        paper = "Vapnik, 1998"
        reference = "facebookresearch/DomainBed@22002ea domainbed/algorithms.py:ERM"
        backbone_need = None

    test_file = _write(
        tmp_path / "tests" / "test_x.py",
        'import pytest\n\n@pytest.mark.algorithm("old")\ndef test_a(): pass\n',
    )
    tests = tool.marked_tests_in_file(test_file)
    rows = tool.build_rows({"newer": Newer, "old": Old, "erm": Base}, tests)
    assert [r.name for r in rows] == ["erm", "old", "newer"]  # ERM, DomainBed's, others
    table = tool.render_table(rows, base=tmp_path).splitlines()
    assert len(table) == 5
    erm, old, newer = table[2:]
    assert "| any |" in erm and "none + [contract]" in erm
    assert "1 ([test_x.py](tests/test_x.py)) + [contract]" in old
    assert "[arXiv:2401.00001](https://arxiv.org/abs/2401.00001)" in newer
    assert "(https://github.com/owner/repo/blob/abc1234/src/algo.py)" in newer
    assert "| a ViT |" in newer


README = """\
# Title

Intro text.

<!-- algorithm-table:start -->
| stale | table |
<!-- algorithm-table:end -->

Text after.
"""


def test_write_replaces_only_the_text_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    block = "| new | table |\n"
    assert tool.write_readme(readme, block) is True
    expected = README.replace("| stale | table |\n", block)
    assert readme.read_text() == expected
    assert tool.write_readme(readme, block) is False  # idempotent
    assert tool.check_readme(readme, block) is None

    readme.write_text(README)
    message = tool.check_readme(readme, block)
    assert message is not None and "python tools/algorithm_table.py --write" in message
    assert "-| stale | table |" in message and "+| new | table |" in message


def test_a_readme_without_markers_is_a_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n| a hand-written | table |\n")
    with pytest.raises(tool.TableError) as error:
        tool.write_readme(readme, "| new |\n")
    message = str(error.value)
    assert str(readme) in message and tool.START in message and tool.END in message
    assert readme.read_text() == "# Title\n\n| a hand-written | table |\n"  # untouched

    readme.write_text(f"{tool.END}\n{tool.START}\n")  # in the wrong order
    with pytest.raises(tool.TableError, match="exactly one line"):
        tool.check_readme(readme, "x\n")


def test_cli_check_exits_1_naming_the_command(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert tool.main(["--check", str(readme)]) == 1
    assert f"--write {readme}" in capsys.readouterr().err
    assert tool.main(["--write", str(readme)]) == 0
    assert tool.main(["--check", str(readme)]) == 0
    assert "| `erm` |" in readme.read_text()
