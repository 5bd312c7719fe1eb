"""README.md's classroom exercises: each one's test command selects exactly its own tests, and
fails on the wrong answers a student plausibly writes.

For every exercise, a copy of the project in tmp_path gets one wrong version of the exercise's
code at a time, and the exercise's own command, as the README writes it, must then fail; on the
unchanged copy it must pass (else a failure would prove nothing). Run:
    python -m pytest -q test_classroom.py"""

import ast
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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
        "test_mix_trains_the_embeddings_through_both_terms",
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

# Wrong answers, per exercise: (what the student got wrong, function of ift.py, change). A
# change is a new body for the whole function, or a pair (old, new) that replaces one piece of it.
WRONG = {
    1: [("losses not masked before the suffix sum", "relation_weights",
         ("c = token_losses * mask / n", "c = token_losses / n")),
        ("a prefix sum for the suffix sum", "relation_weights",
         ("steps[None, :] - steps[:, None]", "steps[:, None] - steps[None, :]")),
        ("weights that sum to 1 instead of averaging 1", "relation_weights",
         ("return S * n / Z", "return S / Z")),
        ("no special case for gamma = 0", "relation_weights",
         ("    if gamma == 0:\n        return mask.clone()\n", "")),
        ("weights always detached", "relation_weights", ("    if detach:\n", "    if True:\n"))],
    2: [("no shift: the prediction at its own position", "shifted_predictions", '''
    return torch.where(mask, yhat, x)
'''),
        ("the shift the wrong way", "shifted_predictions", '''
    x_tilde = x.clone()
    x_tilde[:, :-1] = torch.where(mask[:, 1:], yhat[:, 1:], x[:, :-1])
    return x_tilde
'''),
        ("the mask read at the input, not the target", "shifted_predictions", '''
    x_tilde = x.clone()
    x_tilde[:, 1:] = torch.where(mask[:, 1:], yhat[:, :-1], x[:, 1:])
    return x_tilde
'''),
        ("E(x~) detached, against departure 4", "ift_loss",
         ("lam * E(x_tilde)", "lam * E(x_tilde).detach()")),
        ("lam and 1 - lam swapped", "ift_loss",
         ("(1 - lam) * E(x) + lam * E(x_tilde)", "lam * E(x) + (1 - lam) * E(x_tilde)"))],
    3: [("the mix of E(x) with itself (README's first break)", "ift_loss",
         ("lam * E(x_tilde)", "lam * E(x)")),
        ("no special case for gamma = 0 (README's second break)", "relation_weights",
         ("        return mask.clone()", "        pass"))],
    4: [("no beta in the loss", "dpo_loss",
         ("-F.logsigmoid(beta * h)", "-F.logsigmoid(h)")),
        ("the reference model forgotten", "dpo_loss",
         ("h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - "
          "ref_rejected_logps)", "h = policy_chosen_logps - policy_rejected_logps")),
        ("rewards without beta", "dpo_loss",
         ("rewards_chosen = beta * (", "rewards_chosen = (")),
        ("a sum over pairs, not a mean", "dpo_loss", ("(beta * h).mean()", "(beta * h).sum()"))],
    6: [("random tokens in place of the model's predictions", "shifted_predictions",
         ("yhat[:, :-1]", "torch.randint_like(yhat[:, :-1], 0, 50)"))],
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


def with_wrong_answer(source, function, change):
    """ift.py's source with one function's body replaced, or one line of it changed."""
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == function)
    lines = source.splitlines(keepends=True)
    first = node.body[1].lineno if ast.get_docstring(node) else node.body[0].lineno
    start, end = first - 1, node.end_lineno
    body = "".join(lines[start:end])
    if isinstance(change, tuple):
        old, new = change
        assert body.count(old) == 1, f"{function} has no single {old!r}"
        body = body.replace(old, new)
    else:
        body = change.lstrip("\n")
    return "".join(lines[:start]) + body + "".join(lines[end:])


def run(command, folder, collect_only=False):
    """A README command run in folder: (exit status, output)."""
    args = shlex.split(command)[3:]  # what follows `python -m pytest`
    extra = ["--collect-only"] if collect_only else []
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *extra, *args],
                       cwd=folder, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout + r.stderr


def test_every_exercise_with_tests_names_its_command():
    """The README's Classroom section names a test command for exactly the exercises above."""
    assert set(exercise_commands()) == set(INTENDED) == set(WRONG)


@pytest.mark.parametrize("number", sorted(INTENDED))
def test_exercise_command_collects_only_its_own_tests(number):
    """The README's command of one exercise, collected as written: exactly INTENDED[number]."""
    for command in exercise_commands()[number]:
        status, output = run(command, HERE, collect_only=True)
        assert status == 0, output
        collected = {line.split("::", 1)[1] for line in output.splitlines() if "::" in line}
        assert collected == INTENDED[number], command


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """{(exercise, wrong answer or None): (exit status, output)} of the exercise's commands on a
    copy of the project holding that wrong answer (None: the copy unchanged), run side by side."""
    source = (HERE / "ift.py").read_text()
    jobs = {}
    for number, wrongs in WRONG.items():
        for what, function, change in [(None, None, None), *wrongs]:
            folder = tmp_path_factory.mktemp(f"exercise{number}")
            for name in ("test_ift.py", "plumbing.py", "pytest.ini"):
                shutil.copy(HERE / name, folder / name)
            mutated = source if what is None else with_wrong_answer(source, function, change)
            (folder / "ift.py").write_text(mutated)
            jobs[number, what] = [(command, folder) for command in exercise_commands()[number]]

    def outcome(key):
        results = [run(command, folder) for command, folder in jobs[key]]
        return max(status for status, _ in results), "\n".join(out for _, out in results)
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(jobs, pool.map(outcome, jobs)))


@pytest.mark.parametrize("number", sorted(WRONG))
def test_exercise_command_passes_on_the_right_answer(number, outcomes):
    """On the unchanged copy the exercise's command passes: the harness itself is sound."""
    status, output = outcomes[number, None]
    assert status == 0, output[-3000:]


@pytest.mark.parametrize("number, what", [(n, what) for n, wrongs in WRONG.items()
                                          for what, _, _ in wrongs])
def test_exercise_command_fails_on_a_wrong_answer(number, what, outcomes):
    """One plausible wrong answer: the exercise's own command fails on it, by a failing test."""
    status, output = outcomes[number, what]
    assert status == 1, f"exercise {number}, {what}: exit {status}\n{output[-3000:]}"
