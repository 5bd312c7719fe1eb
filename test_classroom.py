"""README.md's classroom exercises: each one's test command selects exactly the tests meant for it.

Only collection (pytest --collect-only) runs here, so nothing is trained and no selected test runs.
Run: python -m pytest -q test_classroom.py"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# the tests each exercise is meant to run: a handful of fast ones, none through the command line
INTENDED = {
    1: {"test_relation_weights_closed_form_for_uniform_losses",
        "test_relation_weights_masks_and_special_cases",
        "test_relation_weights_gradient_worked_example"},
    2: {"test_mix_replaces_answer_inputs_only",
        "test_mix_leaves_the_first_answer_token_loss_unchanged",
        "test_mix_uses_the_models_own_predictions",
        "test_ift_with_lam0_gamma0_is_sft_in_value_and_gradient"},
    3: {"test_ift_with_lam0_gamma0_is_sft_in_value_and_gradient",
        "test_ift_differs_from_sft_when_lam_or_gamma_is_positive",
        "test_mix_uses_the_models_own_predictions",
        "test_relation_weights_masks_and_special_cases"},
    4: {"test_dpo_is_ln2_at_the_reference_with_closed_form_gradient"},
    6: {"test_mix_replaces_answer_inputs_only",
        "test_mix_leaves_the_first_answer_token_loss_unchanged",
        "test_mix_uses_the_models_own_predictions"},
}


def exercise_commands():
    """{exercise number: the `python -m pytest ...` commands it names} from README's Classroom."""
    text = (HERE / "README.md").read_text()
    section = text.split("\n## Classroom\n", 1)[1].split("\n## ", 1)[0]
    commands = {}
    for item in re.split(r"\n(?=\d+\. )", section):
        number = re.match(r"\d+(?=\. )", item)
        found = re.findall(r"`(python -m pytest [^`]*)`", item)
        if number and found:
            commands[int(number.group())] = found
    return commands


def test_every_exercise_with_tests_names_its_command():
    """The README's Classroom section names a test command for exactly the exercises above."""
    assert set(exercise_commands()) == set(INTENDED)


@pytest.fixture(scope="module")
def collections():
    """{(exercise, command): (exit status, output)} of each README command with --collect-only,
    the collections run side by side (each one starts Python and imports torch)."""
    running = {}
    for number, commands in exercise_commands().items():
        for command in commands:
            args = shlex.split(command)[3:]  # what follows `python -m pytest`
            running[number, command] = subprocess.Popen(
                [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider",
                 *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {key: p.communicate(timeout=300)[0] for key, p in running.items()}
    return {key: (running[key].returncode, output) for key, output in outputs.items()}


@pytest.mark.parametrize("number", sorted(INTENDED))
def test_exercise_command_collects_only_its_own_tests(number, collections):
    """The README's command of one exercise, collected as written: exactly INTENDED[number]."""
    mine = {command: result for (n, command), result in collections.items() if n == number}
    assert mine, f"README.md names no test command for exercise {number}"
    for command, (status, output) in mine.items():
        assert status == 0, output
        collected = {line.split("::", 1)[1] for line in output.splitlines() if "::" in line}
        assert collected == INTENDED[number], command
