"""Tests for frozen_lake.py: the transition table against Gymnasium's FrozenLake-v1 construction,
the exact analysis against known optima, sampling and a plain value iteration, each loss against
its closed form, and the command line end to end.

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
import frozen_lake_sweep as flsweep
import plumbing
from frozen_lake import DOWN, LEFT, RIGHT, UP

SCRIPT = Path(__file__).with_name("frozen_lake.py")
SWEEP = Path(__file__).with_name("frozen_lake_sweep.py")


# -----------------------------------------------------------------------------------------------
# Gymnasium's FrozenLake-v1, as the tests' reference (gymnasium is not a dependency)


def gymnasium_table(desc, is_slippery):
    """P[s][a] = [(prob, next_state, reward, terminated), ...] built the way Gymnasium's
    FrozenLakeEnv.__init__ builds it: success_rate 1/3, fail_rate (1 - 1/3) / 2, each slip listed
    in the order (a - 1) % 4, a, (a + 1) % 4 even when two land on the same cell, reward 1 on
    entering G, H and G absorbing with [(1.0, s, 0, True)]. Written from its documented rules."""
    nrow, ncol = len(desc), len(desc[0])
    success_rate = 1.0 / 3.0
    fail_rate = (1.0 - success_rate) / 2.0

    def landing(row, col, a):
        if a == 0:
            col = max(col - 1, 0)
        elif a == 1:
            row = min(row + 1, nrow - 1)
        elif a == 2:
            col = min(col + 1, ncol - 1)
        else:
            row = max(row - 1, 0)
        letter = desc[row][col]
        return row * ncol + col, float(letter == "G"), letter in "GH"

    P = {}
    for row in range(nrow):
        for col in range(ncol):
            s = row * ncol + col
            P[s] = {}
            for a in range(4):
                if desc[row][col] in "GH":
                    P[s][a] = [(1.0, s, 0, True)]
                elif is_slippery:
                    P[s][a] = [(success_rate if b == a else fail_rate, *landing(row, col, b))
                               for b in ((a - 1) % 4, a, (a + 1) % 4)]
                else:
                    P[s][a] = [(1.0, *landing(row, col, a))]
    return P


def plain_value_iteration(P, n_states, discount, sweeps):
    """Textbook value iteration over P's lists: Q = sum p * (r + discount * V(s') * (not done)),
    V = max_a Q, `sweeps` times from V = 0; returns V and the Q of that V."""
    def backup(V):
        return np.array([[sum(p * (r + discount * V[t] * (not done)) for p, t, r, done in P[s][a])
                          for a in range(4)] for s in range(n_states)])  # (S, A)

    V = np.zeros(n_states)
    for _ in range(sweeps):
        V = backup(V).max(axis=1)
    return V, backup(V)


def experiment(map_name):
    """A map's experiment as frozen_lake builds it: config, env, routes, pi*, demonstrations."""
    cfg = fl.Config(map=map_name)
    env, chosen, rejected, _, pi_star, demos = fl.problem(cfg)
    return cfg, env, chosen, rejected, pi_star, demos


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


def reference(policy, demos):
    """DPO's reference log-probs of the two routes, as frozen_lake.train computes them."""
    with torch.no_grad():
        return fl.route_logps(policy, demos)


# -----------------------------------------------------------------------------------------------
# Environment: conformance with Gymnasium's FrozenLake-v1


@pytest.mark.parametrize("map_name", list(fl.MAPS))
@pytest.mark.parametrize("slippery", [False, True])
def test_transition_tensor_is_gymnasiums_table(map_name, slippery):
    """K[s, a, s'] equals Gymnasium's P[s][a] summed per next state; G and H as Gymnasium's."""
    env = fl.FrozenLake(fl.MAPS[map_name], slippery=slippery)
    P = gymnasium_table(fl.MAPS[map_name], slippery)
    K = np.zeros((env.n_states, 4, env.n_states))
    for s, a in np.ndindex(env.n_states, 4):
        for prob, t, reward, terminated in P[s][a]:
            K[s, a, t] += prob
            if not env.terminal[s]:  # entering G (only G) pays and ends; entering H ends
                assert (reward == 1.0) == env.goal[t] and terminated == env.terminal[t]
    np.testing.assert_array_equal(env.K, K)


@pytest.mark.parametrize("map_name, slippery", [("4x4", True), ("8x8", True), ("dead-end", False)])
def test_value_iteration_matches_a_plain_one_on_gymnasiums_table(map_name, slippery):
    """value_iteration's V* and Q* equal a textbook value iteration over Gymnasium's P lists."""
    env = fl.FrozenLake(fl.MAPS[map_name], slippery=slippery)
    P = gymnasium_table(fl.MAPS[map_name], slippery)
    V, Q = fl.value_iteration(env, 0.95, tol=0.0, max_iters=60)
    V_plain, Q_plain = plain_value_iteration(P, env.n_states, 0.95, sweeps=60)
    np.testing.assert_allclose(V, V_plain, rtol=0, atol=1e-12)
    np.testing.assert_allclose(Q, Q_plain, rtol=0, atol=1e-12)


def test_transition_tensor_hand_checked_4x4():
    """4x4 cells checked by hand: wall, move, hole, goal, absorbing H and G, slips."""
    K = fl.FrozenLake(fl.MAPS["4x4"]).K
    assert K[0, LEFT, 0] == K[0, UP, 0] == 1.0  # bumping the wall means staying
    assert K[0, DOWN, 4] == 1.0 and K[4, RIGHT, 5] == 1.0  # row 1 col 1 is a hole
    assert K[14, RIGHT, 15] == 1.0  # into the goal
    assert (K[5, :, 5] == 1.0).all() and (K[15, :, 15] == 1.0).all()  # H and G absorb
    K = fl.FrozenLake(fl.MAPS["4x4"], slippery=True).K
    # LEFT from the corner: UP and LEFT both bump (stay, 2 x 1/3), DOWN reaches state 4
    assert K[0, LEFT, 0] == pytest.approx(2 / 3) and K[0, LEFT, 4] == pytest.approx(1 / 3)
    np.testing.assert_allclose(K.sum(axis=-1), 1.0)


def test_time_limits_are_gymnasiums():
    """FrozenLake-v1 is registered with 100 steps on 4x4, and 200 on 8x8 (FrozenLake8x8-v1)."""
    assert fl.TIME_LIMITS["4x4"] == 100 and fl.TIME_LIMITS["8x8"] == 200
    assert fl.make_env(fl.Config(map="8x8")).max_episode_steps == 200


# -----------------------------------------------------------------------------------------------
# Exact analysis


def test_value_iteration_slippery_4x4_known_optima():
    """Slippery 4x4: best success 14/17 without limit, 0.744 within 100 steps; random 0.014."""
    env = fl.FrozenLake(fl.MAPS["4x4"], slippery=True)
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
    """Exact goal and visit probabilities of a random policy agree with 3000 episodes sampled
    from Gymnasium's table (20-step limit)."""
    env = fl.FrozenLake(fl.MAPS["4x4"], slippery=True, max_episode_steps=20)
    P = gymnasium_table(fl.MAPS["4x4"], is_slippery=True)
    pi = np.random.default_rng(0).dirichlet(np.ones(4), size=16)  # (S, A)
    rng = np.random.default_rng(1)
    goals, visits = 0, np.zeros(16)
    for _ in range(3000):
        s, seen = 0, {0}
        for _ in range(20):
            outcomes = P[s][rng.choice(4, p=pi[s])]
            _, s, reward, terminated = outcomes[rng.choice(len(outcomes),
                                                           p=[o[0] for o in outcomes])]
            seen.add(s)
            goals += reward
            if terminated:
                break
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
    if env.letters[state] == "G":
        return [path]
    routes = []
    for a in range(4):
        nxt = env.move(state, a)
        if nxt not in path and env.letters[nxt] != "H":
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
    assert chosen.actions == [DOWN] * 4 + [RIGHT] * 2 and env.letters[chosen.states[-1]] == "G"
    assert rejected.actions == [RIGHT] * 4 + [DOWN] * 3
    assert rejected.states == [0, 1, 2, 3, 4, 9, 14, 19]  # row 0, then column 4 down to row 3
    assert [env.letters[s] for s in rejected.states] == list("SFFFFFF") + ["H"]
    assert fl.route_return(chosen, 0.95, env) == pytest.approx(0.95**5)
    assert fl.route_return(rejected, 0.95, env) == 0.0
    two_routes_cells = "".join(fl.MAPS["two-routes"])
    differ = [s for s in range(env.n_states) if env.letters[s] != two_routes_cells[s]]
    assert differ == [19]  # one cell apart from two-routes: the hole at row 3 col 4


def test_dead_end_rejected_route_disagrees_with_pi_star_on_every_move():
    """dead-end: pi* takes every chosen move and none of the 7 rejected ones (turns back)."""
    cfg, env, chosen, rejected, pi_star, demos = experiment("dead-end")
    assert disagreements(chosen, pi_star) == 0
    assert disagreements(rejected, pi_star) == 7
    assert [int(pi_star[s].argmax()) for s in rejected.states[1:-1]] == [LEFT] * 4 + [UP] * 2


def test_routes_to_the_goal_disagree_with_pi_star_on_fewer_than_half():
    """Deterministic 4x4: every simple S-G route disagrees with pi* on (T - d(S)) / 2 moves."""
    env = fl.FrozenLake(fl.MAPS["4x4"])
    _, Q = fl.value_iteration(env, discount=0.95)
    pi_star = fl.optimal_policy_matrix(Q)
    d_start = len(fl.two_routes(env, "")[0].actions)
    routes = all_simple_routes(env, env.start, [env.start])
    assert len(routes) > 2
    for states in routes:
        actions = [next(a for a in range(4) if env.move(s, a) == t)
                   for s, t in zip(states, states[1:])]
        route = fl.Route(states, actions)
        assert disagreements(route, pi_star) == (len(actions) - d_start) / 2


def test_rejected_routes_on_gymnasiums_maps():
    """4x4 and 8x8: the rejected route starts with another move, reaches G, never revisits S."""
    for map_name, length in (("4x4", 6), ("8x8", 14)):
        env = fl.FrozenLake(fl.MAPS[map_name])
        best, second = fl.two_routes(env, fl.REJECTED_ROUTES[map_name])
        assert len(best.actions) == length == len(second.actions)  # here just as short
        assert second.actions[0] != best.actions[0] and env.letters[second.states[-1]] == "G"
        assert env.start not in second.states[1:]


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
    pi = fl.policy_matrix(policy, env.n_states)  # (S, A)
    losses = np.array([-math.log(pi[s, a]) for s, a in zip(chosen.states, chosen.actions)])
    with torch.no_grad():
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
    true_inputs = torch.eye(env.n_states, dtype=torch.float64)[chosen.states[:-1]]  # (T, S)
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
    value, grads = loss_and_grads(fl.dpo_route_loss, policy, demos, reference(policy, demos), cfg)
    assert value == pytest.approx(math.log(2), rel=1e-12)
    policy.zero_grad()
    chosen_logps, rejected_logps = fl.route_logps(policy, demos)
    (chosen_logps - rejected_logps).sum().backward()
    for g, p in zip(grads, policy.parameters()):
        torch.testing.assert_close(g, -cfg.dpo_beta / 2 * p.grad)


def test_route_logps_sum_the_policy_matrix(setup):
    """route_logps: sum over each route's moves of log pi(a|s), read off the policy matrix."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    policy = seeded_policy("neural", env.n_states)
    pi = fl.policy_matrix(policy, env.n_states)  # (S, A)
    with torch.no_grad():
        got = [x.item() for x in fl.route_logps(policy, demos)]
    for value, route in zip(got, (chosen, rejected)):
        expected = sum(math.log(pi[s, a]) for s, a in zip(route.states, route.actions))
        assert value == pytest.approx(expected, rel=1e-10)


def test_orpo_matches_closed_form(setup):
    """ORPO equals -mean log p(chosen) - beta log sigmoid(log odds ratio), written by hand."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    policy = seeded_policy("neural", env.n_states)
    pi = fl.policy_matrix(policy, env.n_states)  # (S, A)
    with torch.no_grad():
        value = fl.orpo_route_loss(policy, demos, None, cfg).item()

    def mean_logp(route):
        return np.mean([math.log(pi[s, a]) for s, a in zip(route.states, route.actions)])

    p_chosen, p_rejected = math.exp(mean_logp(chosen)), math.exp(mean_logp(rejected))
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


def test_every_method_starts_from_the_seeds_weights_and_dpo_from_its_reference(setup):
    """train: same seed, same start for every method; DPO's first loss is ln 2 (policy = ref)."""
    cfg, env, chosen, rejected, pi_star, demos = setup
    cfg = dataclasses.replace(cfg, steps=2)
    start, _ = fl.train("neural", 3, "start", cfg, env, demos, pi_star)
    _, curve = fl.train("neural", 3, "DPO", cfg, env, demos, pi_star)
    assert [step for step, _, _ in curve] == [0, 1, 2]
    assert curve[0][1] == pytest.approx(math.log(2), rel=1e-12)
    pi = fl.policy_matrix(start, env.n_states)
    assert curve[0][2] == pytest.approx(float(((pi - pi_star)[~env.terminal] ** 2).mean()))


# -----------------------------------------------------------------------------------------------
# Spread over seeds and verdicts


def fake_runs(values_per_seed):
    """Runs as run_experiment returns them (the numbers only), seed k's all values_per_seed[k]."""
    keys = ("mse", "mse_route", "mse_other", "goal_prob", "n_visited")
    return [{"family": family, "method": method, "seed": seed, **{key: value for key in keys}}
            for family in fl.FAMILIES for method in ("start",) + fl.METHODS
            for seed, value in enumerate(values_per_seed)]


def test_report_gives_the_sample_std():
    """report: mean and std equal statistics.mean and statistics.stdev (ddof 1) over seeds."""
    values = [0.1, 0.25, 0.3, 0.7, 0.2]
    for entry in fl.report(fake_runs(values), fl.Config())[0].values():
        for key in ("mse", "mse_route", "mse_other", "goal_prob", "n_visited"):
            assert entry[key]["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert entry[key]["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
    for entry in fl.report(fake_runs([0.4]), fl.Config())[0].values():  # one seed: std 0.0
        assert all(v == {"mean": 0.4, "std": 0.0} for v in entry.values())


def test_report_ranks_by_mse_and_needs_all_three_explorers_above_sft():
    """report: ranking by mean MSE; the visits claim holds only if DPO, ORPO and IFT beat SFT."""
    mse = dict(zip(fl.METHODS, (0.3, 0.1, 0.4, 0.2)))  # METHODS: SFT, DPO, ORPO, IFT
    visited = {"tabular": dict(zip(fl.METHODS, (7.0, 9.2, 7.0, 7.2))),
               "neural": dict(zip(fl.METHODS, (7.0, 8.0, 7.4, 7.2)))}
    runs = fake_runs([0.5])
    for run in runs:
        if run["method"] != "start":
            run["n_visited"] = visited[run["family"]][run["method"]]
            run["mse"] = mse[run["method"]] if run["family"] == "tabular" else 0.5
    _, rankings, explorers = fl.report(runs, fl.Config())
    assert rankings["tabular"] == ["DPO", "IFT", "SFT", "ORPO"]
    assert explorers["tabular"]["more_than_sft"] == ["DPO", "IFT"]
    assert not explorers["tabular"]["holds"] and explorers["neural"]["holds"]


def test_sweep_rows_report_the_sample_std(setup):
    """sweep: each row's mse_std is statistics.stdev of its per-seed MSEs (2 seeds)."""
    _, env, chosen, rejected, pi_star, demos = setup
    cfg = flsweep.SweepConfig(seeds=2, steps=3, sweep_lrs=(0.05,), sweep_dpo_betas=(0.1,),
                              sweep_orpo_betas=(0.25,))
    rows, _ = flsweep.sweep(cfg, env, demos, pi_star)
    assert len(rows) == len(fl.FAMILIES) * len(fl.METHODS)
    for row in rows:
        assert row["mse_mean"] == pytest.approx(statistics.mean(row["mse_seeds"]), rel=1e-12)
        assert row["mse_std"] == pytest.approx(statistics.stdev(row["mse_seeds"]), rel=1e-12)


# -----------------------------------------------------------------------------------------------
# Command line


def run_cli(*args, script=SCRIPT):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=120)


def test_end_to_end_command_line(tmp_path):
    """A tiny real run writes every output file; its table lists every family and method."""
    result = run_cli("--seeds", "1", "--steps", "5", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "results.json", "frozen_lake.png", "frozen_lake_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
        if name != "config.json":
            assert f"wrote {tmp_path / name}" in result.stdout
    for family in fl.FAMILIES:
        for method in ("start",) + fl.METHODS:
            assert f"{family:8s} {method:6s} |" in result.stdout
        assert f"{family} ranking by MSE:" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["steps"] == 5
    assert all(v["std"] == 0.0 for entry in results["summary"].values() for v in entry.values())
    assert len(results["runs"]) == len(fl.FAMILIES) * (1 + len(fl.METHODS))
    assert set(results["ranking"]["tabular"]) == set(fl.METHODS)
    assert results["optimal_value_at_start"] == pytest.approx(0.95**5)


def test_end_to_end_dead_end_map(tmp_path):
    """A tiny run on dead-end: its routes, rankings and visit verdicts printed, results saved."""
    result = run_cli("--map", "dead-end", "--seeds", "1", "--steps", "5",
                     "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert ("sub-optimal (rejected) : 7 moves RRRRDDD into a hole, return 0.0000; pi* takes 0 of "
            "them") in result.stdout
    for family in fl.FAMILIES:
        assert f"{family} ranking by MSE:" in result.stdout
        assert f"{family} visited cells: DPO " in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["map"] == fl.MAPS["dead-end"]
    assert results["routes"]["suboptimal"] == {"states": [0, 1, 2, 3, 4, 9, 14, 19],
                                               "actions": [2, 2, 2, 2, 1, 1, 1], "return": 0.0}
    assert set(results["visits_verdict"]) == set(fl.FAMILIES)
    assert (tmp_path / "frozen_lake.png").stat().st_size > 0


def test_sweep_command_line(tmp_path):
    """A tiny sweep writes its files and verdicts beside the main run's, leaving those alone; its
    lr 0.05 rows equal the main run's MSE."""
    main_run = run_cli("--seeds", "1", "--steps", "5", "--out-dir", str(tmp_path))
    assert main_run.returncode == 0, main_run.stderr
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_cli("--seeds", "1", "--steps", "5", "--sweep-lrs", "0.05", "0.2", "--out-dir",
                     str(tmp_path), script=SWEEP)
    assert result.returncode == 0, result.stderr
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    for name in ("sweep.json", "frozen_lake_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    n_variants = 2 + 2 + 2  # SFT, IFT, DPO at betas 0.1 and 0.5, ORPO at 0.25 and 1.0
    assert len(sweep["rows"]) == len(fl.FAMILIES) * 2 * n_variants  # family x lr x variant
    for family in fl.FAMILIES:
        assert list(sweep["verdicts"][family]["ranking_at_lr"]) == ["0.05", "0.2"]
        assert f"sweep {family} oracle, " in result.stdout
        assert f"sweep {family} paper's order DPO > IFT > ORPO > SFT holds at " in result.stdout
    assert result.stdout.count(" of 8 grid points (") == len(fl.FAMILIES)  # 2 lrs x 2 x 2 betas
    main = json.loads((tmp_path / "results.json").read_text())["summary"]
    beta = {"SFT": None, "DPO": 0.1, "ORPO": 0.25, "IFT": None}  # the main run's betas
    same = [r for r in sweep["rows"] if r["lr"] == 0.05 and r["beta"] == beta[r["method"]]]
    assert len(same) == len(fl.FAMILIES) * len(fl.METHODS)
    for row in same:  # the sweep at the main run's lr and betas repeats the main run exactly
        main_mse = main[f"{row['family']}/{row['method']}"]["mse"]["mean"]
        assert row["mse_mean"] == pytest.approx(main_mse, rel=1e-12)
    for family, verdict in sweep["verdicts"].items():  # the oracle: each method's lowest row
        for best in verdict["oracle"]:
            assert best["mse_mean"] == min(r["mse_mean"] for r in sweep["rows"] if
                                           (r["family"], r["method"]) == (family, best["method"]))
        assert verdict["grid_points"] == 8


@pytest.mark.parametrize("args, message", [
    (["--map", "9x9"], "invalid choice"),
    (["--lam", "1.5"], "--lam must lie in [0, 1]"),
    (["--gamma", "-0.1"], "--gamma must lie in [0, 1]"),
    (["--dpo-beta", "0"], "--dpo-beta must be > 0"),
    (["--seeds", "0"], "--seeds must be >= 1"),
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


@pytest.mark.parametrize("program, args, message", [
    (fl, ["--visit-threshold", "0"], "--visit-threshold must lie in (0, 1]"),
    (fl, ["--visit-threshold", "1.5"], "--visit-threshold must lie in (0, 1]"),
    (fl, ["--discount", "0.5"], "--discount must lie in [0.7, 1)"),
    (fl, ["--discount", "1"], "--discount must lie in [0.7, 1)"),
    (fl, ["--lr", "0"], "--lr must be > 0"),
    (fl, ["--orpo-beta", "-1"], "--orpo-beta must be > 0"),
    (fl, ["--steps", "0"], "--steps must be >= 1"),
    (fl, ["--steps", "100001"], "--steps must be <= 100000"),
    (fl, ["--seeds", "101"], "--seeds must be <= 100"),
    (fl, ["--hidden", "4097"], "--hidden must be <= 4096"),
    # plumbing.parse_flags refuses a number that is not finite
    (fl, ["--lr", "nan"], "must be a finite number"),
    (fl, ["--lam", "inf"], "must be a finite number"),
    (fl, ["--discount", "nan"], "must be a finite number"),
    (fl, ["--visit-threshold=-inf"], "must be a finite number"),  # "-inf" alone: a flag
    # frozen_lake_sweep.py: its grid, and frozen_lake.py's checks there too
    (flsweep, ["--sweep-lrs", "0.05", "-1"], "--sweep-lrs must all be > 0"),
    (flsweep, ["--sweep-dpo-betas", "0.1", "0"], "--sweep-dpo-betas must all be > 0"),
    (flsweep, ["--sweep-orpo-betas", "0.25", "0.25"],
     "--sweep-orpo-betas must not repeat a value"),
    (flsweep, ["--sweep-lrs", "0.05", "nan"], "must be a finite number"),
    (flsweep, ["--lam", "1.5"], "--lam must lie in [0, 1]"),
])
def test_every_number_is_range_checked(program, args, message, capsys):
    """A number out of range exits at parse time with status 2 and one 'error:' line naming it,
    in frozen_lake.py and in frozen_lake_sweep.py."""
    with pytest.raises(SystemExit) as exit_info:
        program.main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_the_sweeps_help_and_unwritable_out_dir():
    """frozen_lake_sweep.py --help names every option; an unwritable --out-dir is one line."""
    result = run_cli("--help", script=SWEEP)
    assert result.returncode == 0
    for f in dataclasses.fields(flsweep.SweepConfig):
        assert "--" + f.name.replace("_", "-") in result.stdout
    result = run_cli("--out-dir", "/proc/version/out", script=SWEEP)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: cannot write into --out-dir '/proc/version/out': Not a directory; pass a folder "
        "you can write to"]


def test_limits_accept_their_edges():
    """The range checks accept the values at their closed edges and the defaults."""
    assert fl.config_problem(fl.Config()) is None
    edges = dict(lam=1.0, gamma=0.0, visit_threshold=1.0, discount=0.7, seeds=100, steps=100_000,
                 hidden=4096)
    assert fl.config_problem(dataclasses.replace(fl.Config(), **edges)) is None


def test_unwritable_out_dir_is_a_user_error_with_status_1():
    """An unwritable --out-dir: plumbing.UserError, printed as one 'error:' line, exit status 1."""
    assert fl.UserError is plumbing.UserError
    result = run_cli("--out-dir", "/proc/version/out")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: cannot write into --out-dir '/proc/version/out': Not a directory; "
                     "pass a folder you can write to"]


def test_map_without_a_route_is_a_user_error():
    """two_routes raises plumbing.UserError, naming the fix, when no route reaches G."""
    with pytest.raises(plumbing.UserError, match="goal cannot be reached from the start"):
        fl.two_routes(fl.FrozenLake(["SHG"]), "RR")


def test_main_prints_a_user_error_as_one_line(tmp_path, monkeypatch):
    """main() ends a UserError with sys.exit('error: ...'): one line on stderr, status 1."""
    monkeypatch.setitem(fl.MAPS, "two-routes", ["SHG"])  # a hole between S and G
    with pytest.raises(SystemExit) as exit_info:
        fl.main(["--out-dir", str(tmp_path)])
    message = exit_info.value.code  # sys.exit(str) prints it to stderr and exits with status 1
    assert isinstance(message, str) and message.startswith("error: --map: ")
    assert "\n" not in message and "goal cannot be reached" in message


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
