"""Tests for frozen_lake.py: the environment against Gymnasium's semantics checked by hand, value
iteration against known optima, each loss against its closed form, and the command line end to end.

    python -m pytest -q test_frozen_lake.py
"""

import dataclasses
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import frozen_lake as fl
import ift
import plumbing
from frozen_lake import DOWN, LEFT, RIGHT, UP

SCRIPT = Path(__file__).with_name("frozen_lake.py")


def four_by_four(slippery):
    return fl.FrozenLake(fl.MAPS["4x4"], slippery=slippery, max_episode_steps=100)


def experiment(map_name):
    """A map's experiment as main() builds it: config, env, routes, pi*, demonstrations."""
    cfg = fl.Config(map=map_name)
    env = fl.make_env(cfg)
    chosen, rejected = fl.two_routes(env, fl.REJECTED_ROUTES.get(map_name))
    _, Q = fl.value_iteration(env, cfg.discount)
    demos = fl.make_demonstrations(env, chosen, rejected)
    return cfg, env, chosen, rejected, fl.optimal_policy_matrix(Q), demos


@pytest.fixture
def setup():
    """The default experiment: config, env, routes, pi*, demonstrations."""
    return experiment("two-routes")


def disagreements(route, pi_star):
    """How many of a route's moves pi* never takes."""
    return sum(pi_star[s, a] == 0 for s, a in zip(route.states, route.actions))


def seeded_policy(family, n_states, seed=0):
    torch.manual_seed(seed)
    return fl.make_policy(family, n_states, hidden=16)


def loss_and_grads(loss_fn, policy, demos, ref, cfg):
    policy.zero_grad()
    loss = loss_fn(policy, demos, ref, cfg)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in policy.parameters()]


# -----------------------------------------------------------------------------------------------
# Environment


def test_transition_table_deterministic_4x4():
    """Non-slippery 4x4 P[s][a] on hand-checked cells: wall, move, hole, goal, terminal states."""
    P = four_by_four(slippery=False).P
    assert P[0][LEFT] == [(1.0, 0, 0.0, False)]  # bumping the left wall means staying
    assert P[0][UP] == [(1.0, 0, 0.0, False)]
    assert P[0][DOWN] == [(1.0, 4, 0.0, False)]
    assert P[4][RIGHT] == [(1.0, 5, 0.0, True)]  # row 1 col 1 is a hole: ends, no reward
    assert P[14][RIGHT] == [(1.0, 15, 1.0, True)]  # entering G: reward 1, ends
    for a in range(4):  # H and G loop onto themselves, as Gymnasium builds them
        assert P[5][a] == [(1.0, 5, 0.0, True)]
        assert P[15][a] == [(1.0, 15, 0.0, True)]


def test_transition_table_slippery_4x4():
    """Slippery P[s][a]: moves (a-1)%4, a, (a+1)%4, 1/3 each, listed even when two coincide."""
    P = four_by_four(slippery=True).P
    third = pytest.approx(1 / 3)
    # LEFT from the corner: UP (wall: stay), LEFT (wall: stay), DOWN to state 4
    assert [t[1:] for t in P[0][LEFT]] == [(0, 0.0, False), (0, 0.0, False), (4, 0.0, False)]
    # DOWN from row 3 col 2: LEFT to 13, DOWN (wall: stay), RIGHT into the goal
    assert [t[1:] for t in P[14][DOWN]] == [(13, 0.0, False), (14, 0.0, False), (15, 1.0, True)]
    assert [t[0] for t in P[14][DOWN]] == [third, third, third]
    for s in range(16):
        for a in range(4):
            assert sum(t[0] for t in P[s][a]) == pytest.approx(1.0)
    assert P[5][UP] == [(1.0, 5, 0.0, True)]


def test_reset_and_step_follow_gymnasium():
    """reset/step: a seed repeats a run; hole ends with 0, goal with 1; truncated at step 100."""
    actions = np.random.default_rng(1).integers(0, 4, size=60)
    traces = []
    for _ in range(2):
        env = four_by_four(slippery=True)
        assert env.reset(seed=7) == (0, {"prob": 1})
        traces.append([env.step(int(a)) for a in actions])
    assert traces[0] == traces[1]

    env = four_by_four(slippery=False)
    env.reset(seed=0)
    assert env.step(RIGHT)[:4] == (1, 0.0, False, False)
    assert env.step(DOWN)[:4] == (5, 0.0, True, False)  # a hole
    env.reset()
    for a in (DOWN, DOWN, RIGHT, DOWN, RIGHT):
        env.step(a)
    assert env.step(RIGHT)[:4] == (15, 1.0, True, False)  # the goal
    env.reset()
    for _ in range(99):
        assert env.step(LEFT)[3] is False
    assert env.step(LEFT)[:4] == (0, 0.0, False, True)  # the 100th step is truncated


def test_step_before_reset_raises():
    """Stepping an environment that was never reset is an error, as in Gymnasium."""
    with pytest.raises(RuntimeError):
        four_by_four(slippery=False).step(LEFT)


# -----------------------------------------------------------------------------------------------
# Exact analysis


def test_value_iteration_slippery_4x4_known_optima():
    """Slippery 4x4: best success 14/17 without limit, 0.744 within 100 steps; random 0.014."""
    env = four_by_four(slippery=True)
    V, Q = fl.value_iteration(env, discount=1.0)
    assert V[0] == pytest.approx(14 / 17, abs=1e-6)
    pi_star = fl.optimal_policy_matrix(Q)
    assert fl.goal_probability(env, pi_star, horizon=100_000) == pytest.approx(14 / 17, abs=1e-6)
    # finite horizon: 100 undiscounted backups from V = 0 give the best 100-step success
    V_100, _ = fl.value_iteration(env, discount=1.0, tol=0.0, max_iters=100)
    assert V_100[0] == pytest.approx(0.744, abs=5e-4)
    uniform = np.full((16, 4), 0.25)
    assert fl.goal_probability(env, uniform, horizon=100) == pytest.approx(0.014, abs=5e-4)


def test_goal_and_visit_probabilities_match_sampling():
    """Exact goal and visit probabilities of a random policy agree with 3000 sampled episodes."""
    env = fl.FrozenLake(fl.MAPS["4x4"], slippery=True, max_episode_steps=20)
    pi = np.random.default_rng(0).dirichlet(np.ones(4), size=16)  # (S, A)
    rng = np.random.default_rng(1)
    goals, visits = 0, np.zeros(16)
    env.reset(seed=2)
    for _ in range(3000):
        s, _ = env.reset()
        seen = {s}
        done = False
        while not done:
            s, reward, terminated, truncated, _ = env.step(int(rng.choice(4, p=pi[s])))
            seen.add(s)
            goals += reward
            done = terminated or truncated
        visits[list(seen)] += 1
    assert goals / 3000 == pytest.approx(fl.goal_probability(env, pi, 20), abs=0.03)
    assert visits / 3000 == pytest.approx(fl.visit_probabilities(env, pi, 20), abs=0.03)


def test_optimal_policy_matrix_conventions(setup):
    """pi* splits ties evenly (row 0 col 2 of two-routes) and is uniform on holes and the goal."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    assert pi_star[2] == pytest.approx([0.5, 0.0, 0.5, 0.0])
    for s in np.flatnonzero(env.terminal):
        assert pi_star[s] == pytest.approx([0.25] * 4)
    assert pi_star.sum(axis=1) == pytest.approx(np.ones(env.n_states))


def all_simple_routes(env, state, path):
    """Every start-to-goal path of intended moves that avoids holes and never repeats a state."""
    if env.letter(state) == "G":
        return [path]
    routes = []
    for a in range(4):
        nxt = env.move(state, a)
        if nxt not in path and env.letter(nxt) != "H":
            routes += all_simple_routes(env, nxt, path + [nxt])
    return routes


def test_two_routes_map_has_exactly_the_two_claimed_routes(setup):
    """two-routes: a full search finds exactly our two routes; returns 0.95^5 and 0.95^9."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    found = sorted(all_simple_routes(env, env.start, [env.start]), key=len)
    assert found == [chosen.states, rejected.states]
    assert [env.move(s, a) for s, a in zip(chosen.states, chosen.actions)] == chosen.states[1:]
    assert chosen.actions == [DOWN] * 4 + [RIGHT] * 2
    assert rejected.actions == [RIGHT] * 4 + [DOWN] * 4 + [LEFT] * 2
    assert fl.route_return(chosen, 0.95, env) == pytest.approx(0.95**5)
    assert fl.route_return(rejected, 0.95, env) == pytest.approx(0.95**9)
    V, _ = fl.value_iteration(env, cfg.discount)
    assert V[env.start] == pytest.approx(0.95**5)
    assert [pi_star[s, a] for s, a in zip(chosen.states, chosen.actions)] == [1.0] * 6
    assert fl.goal_probability(env, pi_star, env.max_episode_steps) == pytest.approx(1.0)
    assert disagreements(rejected, pi_star) == 2  # 8 of its 10 moves are optimal


def test_dead_end_routes_reach_the_goal_and_a_hole():
    """dead-end: chosen = two-routes' optimal route to G; rejected walks RRRRDDD into the hole."""
    cfg, env, chosen, rejected, pi_star, demos = experiment("dead-end")
    assert chosen.actions == [DOWN] * 4 + [RIGHT] * 2 and env.letter(chosen.states[-1]) == "G"
    assert rejected.actions == [RIGHT] * 4 + [DOWN] * 3
    assert rejected.states == [0, 1, 2, 3, 4, 9, 14, 19]  # row 0, then column 4 down to row 3
    assert len(set(rejected.states)) == 8  # no wall bump, no state twice
    assert [env.letter(s) for s in rejected.states] == list("SFFFFFF") + ["H"]
    assert fl.route_return(chosen, 0.95, env) == pytest.approx(0.95**5)
    assert fl.route_return(rejected, 0.95, env) == 0.0
    two_routes_cells = "".join(fl.MAPS["two-routes"])
    differ = [s for s in range(env.n_states) if env.letter(s) != two_routes_cells[s]]
    assert differ == [19]  # one cell apart from two-routes: the hole at row 3 col 4


def test_dead_end_rejected_route_disagrees_with_pi_star_on_every_move():
    """dead-end: pi* takes every chosen move and none of the 7 rejected ones (turns back)."""
    cfg, env, chosen, rejected, pi_star, demos = experiment("dead-end")
    assert disagreements(chosen, pi_star) == 0
    assert disagreements(rejected, pi_star) == 7
    assert [int(pi_star[s].argmax()) for s in rejected.states[1:-1]] == [LEFT] * 4 + [UP] * 2


def test_routes_to_the_goal_disagree_with_pi_star_on_fewer_than_half():
    """Deterministic 4x4: every simple S-G route disagrees with pi* on (T - d(S)) / 2 moves."""
    env = four_by_four(slippery=False)
    _, Q = fl.value_iteration(env, discount=0.95)
    pi_star = fl.optimal_policy_matrix(Q)
    d_start = len(fl.shortest_route(env, env.start).actions)
    routes = all_simple_routes(env, env.start, [env.start])
    assert len(routes) > 2
    for states in routes:
        actions = [next(a for a in range(4) if env.move(s, a) == t)
                   for s, t in zip(states, states[1:])]
        route = fl.Route(states, actions)
        assert disagreements(route, pi_star) == (len(actions) - d_start) / 2


# -----------------------------------------------------------------------------------------------
# Losses


@pytest.mark.parametrize("family", fl.FAMILIES)
def test_ift_with_lam_0_and_gamma_0_is_sft(setup, family):
    """IFT with lam = 0 and gamma = 0 equals SFT in value and gradient (ift.py, ift_loss)."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    cfg = dataclasses.replace(cfg, lam=0.0, gamma=0.0)
    policy = seeded_policy(family, env.n_states)
    sft_value, sft_grads = loss_and_grads(fl.sft_route_loss, policy, demos, None, cfg)
    ift_value, ift_grads = loss_and_grads(fl.ift_route_loss, policy, demos, None, cfg)
    assert ift_value == pytest.approx(sft_value, rel=1e-12)
    for g_ift, g_sft in zip(ift_grads, sft_grads):
        torch.testing.assert_close(g_ift, g_sft, rtol=1e-10, atol=1e-12)


def test_ift_relation_weights_match_hand_computation(setup):
    """IFT (lam 0, gamma 0.95) equals (1/N) sum_t l_t w_t with w from the suffix-sum formula."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    cfg = dataclasses.replace(cfg, lam=0.0, gamma=0.95)
    policy = seeded_policy("tabular", env.n_states)
    with torch.no_grad():
        losses = -fl.step_logps(policy, fl.one_hot(demos.chosen_states, env.n_states),
                                demos.chosen_actions)[0].numpy()  # (T,)
        value = fl.ift_route_loss(policy, demos, None, cfg).item()
    n = len(losses)
    suffix = [sum(0.95 ** (j - t) * losses[j] / n for j in range(t, n)) for t in range(n)]
    weights = np.array(suffix) * n / sum(suffix)
    assert weights[0] > 1 > weights[-1]  # early moves weigh more
    assert value == pytest.approx(float((losses * weights).sum() / n), rel=1e-10)


def test_ift_inputs_temporal_residual(setup):
    """IFT input: true one-hot at step 0 and if lam = 0, else (1-lam) x(s*_t) + lam x(shat_t)."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    policy = fl.make_policy("tabular", env.n_states, hidden=16)
    with torch.no_grad():
        policy.weight.zero_()
        policy.weight[RIGHT] = 1.0  # greedy action RIGHT everywhere
    true_inputs = fl.one_hot(demos.chosen_states, env.n_states)[0]  # (T, S)
    torch.testing.assert_close(fl.ift_inputs(policy, demos, lam=0.0)[0], true_inputs)
    mixed = fl.ift_inputs(policy, demos, lam=0.2)[0]  # (T, S)
    torch.testing.assert_close(mixed[0], true_inputs[0])
    for t in range(1, len(chosen.actions)):
        expected = 0.8 * true_inputs[t]
        expected[env.move(chosen.states[t - 1], RIGHT)] += 0.2
        torch.testing.assert_close(mixed[t], expected)


@pytest.mark.parametrize("family", fl.FAMILIES)
def test_dpo_at_reference_is_ln2(setup, family):
    """DPO at policy = reference: loss ln 2, gradient -beta/2 * d[log pi(chosen) - log pi(rej)]."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    policy = seeded_policy(family, env.n_states)
    ref = fl.reference_logps(policy, demos)
    value, grads = loss_and_grads(fl.dpo_route_loss, policy, demos, ref, cfg)
    assert value == pytest.approx(math.log(2), rel=1e-12)
    policy.zero_grad()
    h = (fl.route_logps(policy, demos.chosen_states, demos.chosen_actions, env.n_states)
         - fl.route_logps(policy, demos.rejected_states, demos.rejected_actions, env.n_states))
    h.sum().backward()
    for g, p in zip(grads, policy.parameters()):
        torch.testing.assert_close(g, -cfg.dpo_beta / 2 * p.grad)


def test_orpo_matches_closed_form(setup):
    """ORPO equals -mean log p(chosen) - beta log sigmoid(log odds ratio), written by hand."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    policy = seeded_policy("neural", env.n_states)
    with torch.no_grad():
        value = fl.orpo_route_loss(policy, demos, None, cfg).item()
        lc = fl.route_logps(policy, demos.chosen_states, demos.chosen_actions, env.n_states)
        lr = fl.route_logps(policy, demos.rejected_states, demos.rejected_actions, env.n_states)
    p_chosen = math.exp(lc.item() / len(chosen.actions))  # length-normalised probabilities
    p_rejected = math.exp(lr.item() / len(rejected.actions))
    log_odds_ratio = math.log(p_chosen / (1 - p_chosen)) - math.log(p_rejected / (1 - p_rejected))
    expected = -math.log(p_chosen) + cfg.orpo_beta * math.log(1 + math.exp(-log_odds_ratio))
    assert value == pytest.approx(expected, rel=1e-10)


def test_sft_is_mean_nll_of_the_optimal_route(setup):
    """SFT equals the mean over the route's moves of -log pi(a*|s*), from the policy matrix."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    policy = seeded_policy("tabular", env.n_states)
    pi = fl.policy_matrix(policy, env.n_states)  # (S, A)
    expected = -np.mean([math.log(pi[s, a]) for s, a in zip(chosen.states, chosen.actions)])
    with torch.no_grad():
        value = fl.sft_route_loss(policy, demos, None, cfg).item()
        assert value == pytest.approx(expected, rel=1e-10)


# -----------------------------------------------------------------------------------------------
# Spread over seeds


def fake_runs(values_per_seed):
    """Runs as run_experiment returns them, every number of seed k set to values_per_seed[k]."""
    keys = ("mse", "mse_route", "mse_other", "goal_prob", "n_visited")
    return [{"family": family, "method": method, "seed": seed, **{key: value for key in keys}}
            for family in fl.FAMILIES for method in ("start",) + fl.METHODS
            for seed, value in enumerate(values_per_seed)]


def test_summarize_reports_the_sample_std():
    """summarize: mean and std equal statistics.mean and statistics.stdev (ddof 1) over seeds."""
    values = [0.1, 0.25, 0.3, 0.7, 0.2]
    for entry in fl.summarize(fake_runs(values)).values():
        for key in ("mse", "mse_route", "mse_other", "goal_prob", "n_visited"):
            assert entry[key]["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert entry[key]["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
    assert statistics.stdev(values) == pytest.approx(np.std(values) * math.sqrt(5 / 4))


def test_one_seed_has_std_zero():
    """With one seed the std is 0.0, not nan (plumbing.mean_std, shared): summarize and mean_std."""
    for entry in fl.summarize(fake_runs([0.4])).values():
        assert all(v == {"mean": 0.4, "std": 0.0} for v in entry.values())
    mean, std = fl.mean_std(np.array([[0.1, 0.2, 0.3]]))  # (seeds, steps + 1), as plot_curves
    assert mean.tolist() == [0.1, 0.2, 0.3] and std.tolist() == [0.0, 0.0, 0.0]


def test_mean_std_per_step_is_the_sample_std_of_each_column():
    """mean_std on (seeds, steps): per column, statistics.mean and statistics.stdev."""
    curves = np.random.default_rng(0).random((4, 6))  # (seeds, steps + 1)
    mean, std = fl.mean_std(curves)
    for step in range(6):
        assert mean[step] == pytest.approx(statistics.mean(curves[:, step]), rel=1e-12)
        assert std[step] == pytest.approx(statistics.stdev(curves[:, step]), rel=1e-12)


def test_sweep_rows_report_the_sample_std(setup):
    """run_sweep: each row's mse_std is statistics.stdev of its per-seed MSEs (2 seeds)."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    cfg = dataclasses.replace(cfg, seeds=2, steps=3, sweep_lrs=(0.05,), sweep_dpo_betas=(0.1,),
                              sweep_orpo_betas=(0.25,))
    rows = fl.run_sweep(cfg, env, demos, pi_star)
    assert len(rows) == len(fl.FAMILIES) * len(fl.METHODS)
    for row in rows:
        assert row["mse_mean"] == pytest.approx(statistics.mean(row["mse_seeds"]), rel=1e-12)
        assert row["mse_std"] == pytest.approx(statistics.stdev(row["mse_seeds"]), rel=1e-12)


# -----------------------------------------------------------------------------------------------
# Command line


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)


def test_end_to_end_command_line(tmp_path):
    """A tiny real run writes every output file; its table lists every family and method."""
    result = run_cli("--seeds", "1", "--steps", "5", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "results.json", "results.csv", "curves.csv", "frozen_lake.png",
                 "frozen_lake_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    for family in fl.FAMILIES:
        for method in ("start",) + fl.METHODS:
            assert f"{family:8s} {method:6s} |" in result.stdout
        assert f"{family} ranking by MSE:" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["steps"] == 5
    assert all(v["std"] == 0.0 for entry in results["summary"].values() for v in entry.values())
    assert len(results["runs"]) == len(fl.FAMILIES) * (1 + len(fl.METHODS))
    assert set(results["ranking"]["tabular"]) == set(fl.METHODS)
    curves = (tmp_path / "curves.csv").read_text().splitlines()
    assert len(curves) == 1 + len(fl.FAMILIES) * len(fl.METHODS) * 6  # header + steps 0..5


def test_end_to_end_dead_end_map(tmp_path):
    """A tiny run on dead-end: its routes, rankings and visit verdicts printed, results saved."""
    result = run_cli("--map", "dead-end", "--seeds", "1", "--steps", "5",
                     "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "sub-optimal (rejected) : 7 moves RRRRDDD:" in result.stdout
    assert "(3,4) = a hole" in result.stdout
    assert "return 0.0000; pi* takes 0 of its 7 moves" in result.stdout
    for family in fl.FAMILIES:
        assert f"{family} ranking by MSE:" in result.stdout
        assert f"{family} visited cells: DPO " in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["map"] == fl.MAPS["dead-end"]
    assert results["routes"]["suboptimal"]["return"] == 0.0
    assert set(results["visits_verdict"]) == set(fl.FAMILIES)
    assert (tmp_path / "frozen_lake.png").stat().st_size > 0


def test_visits_verdict_needs_all_three_above_sft():
    """visits_verdict: the paper's statement holds only if DPO, ORPO and IFT all beat SFT."""
    def summary(visited):
        return {f"tabular/{m}": {"n_visited": {"mean": v, "std": 0.0}}
                for m, v in zip(fl.METHODS, visited)}  # METHODS: SFT, DPO, ORPO, IFT

    verdict = fl.visits_verdict(summary([7.0, 9.2, 7.0, 7.2]), "tabular")
    assert verdict["more_than_sft"] == ["DPO", "IFT"] and not verdict["holds"]
    assert fl.visits_verdict(summary([7.0, 8.0, 7.4, 7.2]), "tabular")["holds"]


def test_sweep_command_line(tmp_path):
    """A tiny --sweep writes its files and verdicts; its lr 0.05 rows equal the main run's MSE."""
    result = run_cli("--seeds", "1", "--steps", "5", "--sweep", "--sweep-lrs", "0.05", "0.2",
                     "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("sweep.json", "sweep.csv", "frozen_lake_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
    n_variants = 2 + 2 + 2  # SFT, IFT, DPO at betas 0.1 and 0.5, ORPO at 0.25 and 1.0
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + len(fl.FAMILIES) * 2 * n_variants  # header + family x lr x variant
    for family in fl.FAMILIES:
        for lr in ("0.05", "0.2"):
            assert f"sweep {family} ranking at lr {lr}: " in result.stdout
        assert f"sweep {family} oracle (" in result.stdout
        assert f"sweep {family} paper's order DPO > IFT > ORPO > SFT holds at " in result.stdout
    assert result.stdout.count(" of 8 grid points (") == len(fl.FAMILIES)  # 2 lrs x 2 x 2 betas
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    main = json.loads((tmp_path / "results.json").read_text())["summary"]
    beta = {"SFT": None, "DPO": 0.1, "ORPO": 0.25, "IFT": None}  # the main run's betas
    same = [r for r in sweep["rows"] if r["lr"] == 0.05 and r["beta"] == beta[r["method"]]]
    assert len(same) == len(fl.FAMILIES) * len(fl.METHODS)
    for row in same:  # the sweep at the main run's lr and betas repeats the main run exactly
        main_mse = main[f"{row['family']}/{row['method']}"]["mse"]["mean"]
        assert row["mse_mean"] == pytest.approx(main_mse, rel=1e-12)
    assert set(sweep["verdicts"]) == set(fl.FAMILIES)


@pytest.mark.parametrize("args, message", [
    (["--map", "9x9"], "invalid choice"),
    (["--lam", "1.5"], "--lam must lie in [0, 1]"),
    (["--gamma", "-0.1"], "--gamma must lie in [0, 1]"),
    (["--dpo-beta", "0"], "--dpo-beta must be > 0"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--sweep-lrs", "0.05", "-1"], "--sweep-lrs must all be > 0"),
    (["--out-dir", "/proc/version/out"], "cannot write into --out-dir"),
    (["--hidden", "0"], "--hidden must be >= 1"),
])
def test_bad_input_exits_with_one_line(args, message):
    """Bad input ends with a non-zero exit and one 'error:' line on stderr, never a traceback."""
    result = run_cli(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_help_documents_every_option():
    """--help names every Config field as a flag."""
    result = run_cli("--help")
    assert result.returncode == 0
    for f in dataclasses.fields(fl.Config):
        assert "--" + f.name.replace("_", "-") in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--visit-threshold", "0"], "--visit-threshold must lie in (0, 1]"),
    (["--visit-threshold", "1.5"], "--visit-threshold must lie in (0, 1]"),
    (["--discount", "0.5"], "--discount must lie in [0.7, 1)"),
    (["--discount", "1"], "--discount must lie in [0.7, 1)"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--orpo-beta", "-1"], "--orpo-beta must be > 0"),
    (["--sweep-dpo-betas", "0.1", "0"], "--sweep-dpo-betas must all be > 0"),
    (["--sweep-orpo-betas", "0.25", "0.25"], "--sweep-orpo-betas must not repeat a value"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "100001"], "--steps must be <= 100000"),
    (["--seeds", "101"], "--seeds must be <= 100"),
    (["--hidden", "4097"], "--hidden must be <= 4096"),
])
def test_every_number_is_range_checked(args, message, capsys):
    """A number out of range exits at parse time with status 2 and one 'error:' line naming it."""
    with pytest.raises(SystemExit) as exit_info:
        fl.parse_config(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_limits_accept_their_edges():
    """The range checks accept the values at their closed edges and the defaults."""
    assert fl.config_problem(fl.Config()) is None
    edges = dict(lam=1.0, gamma=0.0, visit_threshold=1.0, discount=0.7, seeds=100, steps=100_000,
                 hidden=4096)
    assert fl.config_problem(dataclasses.replace(fl.Config(), **edges)) is None


# These need plumbing.parse_flags to refuse a number that is not finite at parse time.
@pytest.mark.parametrize("args", [
    ["--lr", "nan"],
    ["--lam", "inf"],
    ["--discount", "nan"],
    ["--sweep-lrs", "0.05", "nan"],
    ["--visit-threshold=-inf"],  # "-inf" alone would be read as a flag, as argparse does
])
def test_nan_and_inf_are_refused(args, capsys):
    """nan and inf in any float flag exit with status 2 and one 'must be a finite number' line."""
    with pytest.raises(SystemExit) as exit_info:
        fl.parse_config(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "must be a finite number" in lines[0]


def test_unwritable_out_dir_is_a_user_error_with_status_1(tmp_path):
    """An unwritable --out-dir: plumbing.UserError, printed as one 'error:' line, exit status 1."""
    assert fl.UserError is plumbing.UserError
    with pytest.raises(plumbing.UserError, match="cannot write into --out-dir"):
        fl.make_out_dir(fl.Config(out_dir="/proc/version/out"))
    result = run_cli("--out-dir", "/proc/version/out")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: cannot write into --out-dir '/proc/version/out': Not a directory; "
                     "pass a folder you can write to"]


def test_map_without_two_routes_is_a_user_error():
    """two_routes raises plumbing.UserError, naming the fix, for no route or no second route to G."""
    with pytest.raises(plumbing.UserError, match="goal cannot be reached from the start"):
        fl.two_routes(fl.FrozenLake(["SHG"]))
    with pytest.raises(plumbing.UserError, match="no second route .* REJECTED_ROUTES"):
        fl.two_routes(fl.FrozenLake(["SFG"]))  # every other first move bumps into a wall


def test_main_prints_a_user_error_as_one_line(tmp_path, monkeypatch):
    """main() ends a UserError with sys.exit('error: ...'): one line on stderr, status 1."""
    monkeypatch.setitem(fl.MAPS, "two-routes", ["SFG"])  # a map with a single route
    with pytest.raises(SystemExit) as exit_info:
        fl.main(["--out-dir", str(tmp_path)])
    message = exit_info.value.code  # sys.exit(str) prints it to stderr and exits with status 1
    assert isinstance(message, str) and message.startswith("error: --map: ")
    assert "\n" not in message and "no second route" in message


def test_importing_leaves_matplotlib_alone_and_the_losses_keep_their_own_names():
    """Importing frozen_lake loads no matplotlib (the backend is chosen where figures are drawn),
    and no loss of its own reuses a loss name of ift.py (whose signatures differ)."""
    code = ("import sys, frozen_lake, ift; print('matplotlib' in sys.modules, sorted("
            "n for n in ('sft_loss', 'dpo_loss', 'orpo_loss', 'ift_loss') "
            "if getattr(frozen_lake, n, None) not in (None, getattr(ift, n))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=SCRIPT.parent, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "[]"]
