"""``common_mistakes.md`` says what its tests measure: every entry links to a test that
exists, every test is linked, and every number a Test paragraph quotes is the
test's own measurement (``mistakes_support.MEASURED``), formatted as the guide
prints it. A number retyped by hand, or left behind when a measurement changes,
fails here.
"""
import inspect
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mistakes_support import MEASURED

from nf4 import quantize_nf4

import test_common_mistakes as first_twelve
import test_common_mistakes_more as the_rest

ROOT = Path(__file__).resolve().parents[3]
GUIDE = (ROOT / "common_mistakes.md").read_text()
MODULES = {"test_common_mistakes.py": first_twelve, "test_common_mistakes_more.py": the_rest}
LLAMA_7B = 6_738_415_616                 # parameters of LLaMA-7B (Touvron et al. 2023, Table 2)
LLAMA_7B_LAYERS, LLAMA_7B_WIDTH = 32, 4096


def section(number: int) -> str:
    """The text of entry ``number``, whitespace collapsed."""
    match = re.search(rf"^### {number}\. .*?(?=^### |^## |\Z)", GUIDE, re.M | re.S)
    assert match, f"common_mistakes.md has no entry {number}"
    return " ".join(match.group(0).split())


def g2(x):
    return f"{x:.2g}"


def sci(x):
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def scale_bits(double_quant):
    """Bits per weight the block constants of the library's NF4 storage cost (blocks of 64)."""
    state = quantize_nf4(np.zeros((256, 1024), np.float32), 64, double_quant)
    return state.bits_per_parameter() - 4


def adapter_at_7b():
    """Full fp16 checkpoint vs an fp16 LoRA adapter, r = 8 on q_proj and v_proj."""
    lora = LLAMA_7B_LAYERS * 2 * 8 * (LLAMA_7B_WIDTH + LLAMA_7B_WIDTH)
    return 2 * LLAMA_7B, 2 * lora


QUOTES = {
    3: lambda m: [f"falls from {g2(m['none', 2])} at r = 2 to {g2(m['none', 32])} at r = 32",
                  f"the best rate is {g2(m['alpha/r', 2])} at r = 2 and "
                  f"{g2(m['alpha/r', 32])} at r = 32"],
    5: lambda m: [f"It is {m[1]:.3g} at r = 1, {m[2]:.3g} at r = 2 and {m[4]:.3g} at r = 4, "
                  f"then {m[8]:.3g}, {m[16]:.3g} and {m[32]:.3g} at r = 8, 16 and 32"],
    6: lambda m: [f"({m['calls_unmerged']} against {m['calls_merged']} here)"],
    9: lambda m: [f"drops by {100 * m['1e-5']:.2g}%", f"({100 * m['1e-4']:.2g}% at 1e-4, "
                  f"{100 * m['1e-3']:.2g}% at 1e-3)"],
    10: lambda m: [f"({m['whole'] / 1000:.0f} KB against {m['adapter'] / 1000:.0f} KB, "
                   f"{m['whole'] / m['adapter']:.0f}x)",
                   f"it is {adapter_at_7b()[0] / 1e9:.1f} GB against "
                   f"{adapter_at_7b()[1] / 1e6:.1f} MB in fp16, about "
                   f"{round(adapter_at_7b()[0] / adapter_at_7b()[1], -2):,.0f}x"],
    12: lambda m: [f"({m['wrong_flops']:,} against {m['right_flops']:,})",
                   f"({m['wrong_bytes']:,} against {m['right_bytes']:,} bytes)"],
    19: lambda m: [f"keeps the base at {m['float_base']:,} bytes against {m['nf4_base']:,} in NF4",
                   f"saves about {m['wrong_saving'] / 1000:.0f} KB on LoRA",
                   f"saves about {m['right_saving'] / 1000:.0f} KB on the base",
                   f"is off by {100 * m['wrong_error']:.0f}% of its largest entry"],
    20: lambda m: [f"({sci(m['wrong_mse'])} against {sci(m['right_mse'])})",
                   f"({100 * m['right_zeros']:.0f}% with blocks)",
                   f"from {scale_bits(False):g} to about {scale_bits(True):.3f} bits per weight"],
}


def linked_tests():
    """[(number, file name, test name)] from the guide's **Test.** lines."""
    return [(int(n), f, t) for n, f, t in re.findall(
        r"^### (\d+)\. .*?\*\*Test\.\*\* \[`code/stage-09/tests/(\S+?)::(test_\w+)`\]", GUIDE,
        re.M | re.S)]


def run(number: int) -> None:
    """Run the test of entry ``number`` (it leaves its numbers in ``MEASURED``)."""
    (test,) = [getattr(MODULES[f], t) for n, f, t in linked_tests() if n == number]
    kwargs = {"tmp_path": Path(tempfile.mkdtemp())} if "tmp_path" in \
        inspect.signature(test).parameters else {}
    test(**kwargs)


def test_every_entry_links_its_own_test_and_every_test_is_linked():
    links = linked_tests()
    assert [n for n, _, _ in links] == list(range(1, 24))
    for number, file, name in links:
        assert name.startswith(f"test_{number:02d}_"), (number, name)
        assert f"[`code/stage-09/tests/{file}::{name}`](code/stage-09/tests/{file})" in GUIDE
        assert callable(getattr(MODULES[file], name, None)), f"{file} has no {name}"
    defined = {name for module in MODULES.values() for name in vars(module)
               if re.match(r"test_\d\d_", name)}
    assert defined == {name for _, _, name in links}


@pytest.mark.parametrize("number", sorted(QUOTES))
def test_the_guide_quotes_what_the_test_measures(number):
    if number not in MEASURED:
        run(number)
    text = section(number)
    for quote in QUOTES[number](MEASURED[number]):
        assert quote in text, f"entry {number} should say {quote!r}"
