"""Frozen Lake: how close does each fine-tuning method get to the truly optimal policy?

The explainable experiment of Intuitive Fine-Tuning (IFT, arXiv:2405.11870 v3: section 5.3,
appendix B.2, figure 3). In a small grid world the optimal policy pi* is known exactly, so "how
close did SFT, DPO, ORPO and IFT get?" has an exact answer: the mean squared error (MSE) between
the learned and the optimal state x action probability matrices, the paper's metric.

    python frozen_lake.py                      # the defaults (run times: README.md)
    python frozen_lake.py --map dead-end       # the second design: a really bad rejected route
    python frozen_lake.py --slippery           # the same on slippery ice
    python frozen_lake.py --map 8x8 --seeds 3  # one of Gymnasium's own maps
    python frozen_lake.py --help               # every option

It prints a line per run, a table (mean +- sample std over the seeds), each policy family's
ranking next to the paper's (DPO > IFT > ORPO > SFT) and whether DPO, ORPO and IFT visit more
cells than SFT. Into --out-dir: config.json, results.json, frozen_lake.png (the policies) and
frozen_lake_curves.png (loss and MSE per step). frozen_lake_sweep.py reruns it on an lr x beta
grid.

Choices made where the paper is silent (the code says "choice N" where it applies one):
 1. Maps: "two-routes" (the default) and "dead-end", drawn above MAPS, or Gymnasium's 4x4 and
    8x8. Deterministic unless --slippery; FrozenLake-v1's dynamics and time limits exactly.
 2. pi* by value iteration, discount 0.95 (shorter routes are better), ties split evenly; the
    MSE is taken over the non-terminal states.
 3. Data: the shortest route to G (chosen) and a second one (rejected, REJECTED_ROUTES), on
    dead-end a walk into a hole, since a route to G cannot be bad move by move.
 4. --slippery changes pi* and the exact metrics, not the data (the routes' intended moves).
 5. Two policy families: tabular (a logit vector per state) and neural (the paper's two-layer
    net: one-hot state, 64 ReLU units, 4 logits); float64.
 6. Training starts from PyTorch's default initialisation, the same for every method within a
    seed; DPO's reference is that starting policy.
 7. The losses are ift.py's with token = action and context = state. IFT mixes the one-hot
    inputs through the live weights; its relation weights are not detached (--detach-weights).
 8. Adam, lr 0.05, 300 full-batch steps for every method, fixed before looking at the MSE.
    frozen_lake_sweep.py shows how the comparison moves with lr and beta, and picks nothing.
 9. Extra exact metrics: P(goal) within the time limit, the cells entered with probability >=
    0.05 ("visited"), and the MSE on and off the optimal route.
"""

import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ift import dpo_loss, orpo_loss, relation_weights
from plumbing import UserError, arg, mean_std, parse_flags, pyplot

# -----------------------------------------------------------------------------------------------
# Config

# The experiment's own map, "two-routes" (choice 1): S start, F frozen, H hole, G goal.
#     S F F F F    optimal route (SFT / IFT data, DPO / ORPO chosen): down, then right to G,
#     F H H H F      6 moves; sub-optimal (DPO / ORPO rejected): right, down, left to G, 10.
#     F H H H F    Every other path falls into a hole or walks in circles.
#     F H H H F    "dead-end" adds a hole at row 3 col 4; its rejected route walks into it
#     F F G F F      (choice 3). On Gymnasium's maps: the shortest route that starts otherwise.
MAPS = {
    "two-routes": ["SFFFF", "FHHHF", "FHHHF", "FHHHF", "FFGFF"],
    "dead-end": ["SFFFF", "FHHHF", "FHHHF", "FHHHH", "FFGFF"],
    "4x4": ["SFFF", "FHFH", "FFFH", "HFFG"],
    "8x8": ["SFFFFFFF", "FFFFFFFF", "FFFHFFFF", "FFFFFHFF",
            "FFFHFFFF", "FHHFFFHF", "FHFFHFHF", "FFFHFFFG"],
}
TIME_LIMITS = {"two-routes": 100, "dead-end": 100, "4x4": 100, "8x8": 200}  # as Gymnasium's
REJECTED_ROUTES = {"two-routes": "RRRRDDDDLL", "dead-end": "RRRRDDD", "4x4": "RRDDDR",
                   "8x8": "RDDDRRRDDRDDRR"}  # intended moves from S
FAMILIES = ("tabular", "neural")
METHODS = ("SFT", "DPO", "ORPO", "IFT")
PAPER_ORDER = ("DPO", "IFT", "ORPO", "SFT")  # the paper's ranking, best (lowest MSE) first
PAPER_EXPLORERS = ("DPO", "ORPO", "IFT")  # the paper: they "explore more grids" than SFT


@dataclass
class Config:
    map: str = arg("two-routes", "the experiment's two designs, or Gymnasium's", choices=list(MAPS))
    slippery: bool = arg(False, "slippery ice: intended or either perpendicular move, 1/3 each")
    seeds: int = arg(5, "number of seeds 0..seeds-1; a seed fixes the policies' starting weights")
    steps: int = arg(300, "optimiser steps per run (every method, both policy families)")
    lr: float = arg(0.05, "Adam learning rate (every method, both policy families)")
    lam: float = arg(0.2, "IFT: weight of the policy's own prediction in its input (eq. 17)")
    gamma: float = arg(0.95, "IFT: decay of relation propagation (eq. 21); 0 switches it off")
    detach_weights: bool = arg(False, "IFT: constant relation weights (the official code: not)")
    dpo_beta: float = arg(0.1, "DPO: beta, the inverse temperature of the preference")
    orpo_beta: float = arg(0.25, "ORPO: beta, the weight of the odds-ratio term")
    discount: float = arg(0.95, "value iteration: discount, < 1 so shorter routes are better")
    hidden: int = arg(64, "neural policy: width of its hidden layer")
    visit_threshold: float = arg(0.05, "a cell counts as visited if entered with this probability")
    out_dir: str = arg("out/frozen_lake", "output folder (created if missing)")


MOST = {"seeds": 100, "steps": 100_000, "hidden": 4096}  # bounds that only catch typos


def config_problem(cfg):
    """The first problem with a config, in one line, or None if it is fine. Each test reads
    "not (inside)", so a nan fails it too (parse_flags already refuses nan and inf)."""
    rules = [(name, "lie in [0, 1]", lambda x: 0.0 <= x <= 1.0) for name in ("lam", "gamma")]
    rules += [("visit_threshold", "lie in (0, 1]", lambda x: 0.0 < x <= 1.0),
              # lower, moves of unequal value far from G fall within pi*'s tie tolerance on
              # slippery 8x8, and pi* would split between them (RESULTS.md section 6)
              ("discount", "lie in [0.7, 1)", lambda x: 0.7 <= x < 1.0)]
    rules += [(name, "be > 0", lambda x: x > 0.0) for name in ("dpo_beta", "orpo_beta", "lr")]
    for name, most in MOST.items():
        rules += [(name, "be >= 1", lambda x: x >= 1),
                  (name, f"be <= {most} (a guard against typos: raise MOST if you mean it)",
                   lambda x, most=most: x <= most)]
    for name, rule, fine in rules:
        if not fine(getattr(cfg, name)):
            return f"--{name.replace('_', '-')} must {rule}, got {getattr(cfg, name)}"
    return None


# -----------------------------------------------------------------------------------------------
# Environment: Gymnasium's FrozenLake-v1 as an exact transition table

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ACTION_LETTERS = "LDRU"  # one letter per action, for printing routes
STEP = {LEFT: (0, -1), DOWN: (1, 0), RIGHT: (0, 1), UP: (-1, 0)}  # (d row, d col) of a move


class FrozenLake:
    """FrozenLake-v1 on S / F / H / G rows (choice 1): state = row * ncol + col, walls clamp,
    entering G pays 1 and ends the episode, entering H ends it, on H and G every action stays.
    Slippery: a with 1/3, (a - 1) % 4 and (a + 1) % 4 with (1 - 1/3) / 2 each, as Gymnasium's.
    K[s, a, s'] = P(s' | s, a) is Gymnasium's P[s][a] summed per next state."""

    def __init__(self, desc, slippery=False, max_episode_steps=100):
        self.desc = list(desc)
        self.nrow, self.ncol = len(desc), len(desc[0])
        self.n_states, self.n_actions = self.nrow * self.ncol, 4
        self.max_episode_steps = max_episode_steps
        self.letters = "".join(self.desc)  # letters[s]: S, F, H or G, state s's letter
        self.start = self.letters.index("S")
        self.p0 = np.eye(self.n_states)[self.start]  # (S,) the start distribution
        self.terminal = np.array([c in "GH" for c in self.letters])  # (S,) bool
        self.goal = np.array([c == "G" for c in self.letters])  # (S,) bool
        p_intended, p_slip = 1.0 / 3.0, (1.0 - 1.0 / 3.0) / 2.0
        self.K = np.zeros((self.n_states, self.n_actions, self.n_states))  # (S, A, S)
        for s, a in product(range(self.n_states), range(self.n_actions)):
            if self.terminal[s]:
                self.K[s, a, s] = 1.0
            elif slippery:  # added up in Gymnasium's order: two wall bumps both mean "stay"
                for b in ((a - 1) % 4, a, (a + 1) % 4):
                    self.K[s, a, self.move(s, b)] += p_intended if b == a else p_slip
            else:
                self.K[s, a, self.move(s, a)] = 1.0

    def move(self, state, action):
        """The state an intended move leads to."""
        d_row, d_col = STEP[action]
        row = min(max(state // self.ncol + d_row, 0), self.nrow - 1)
        col = min(max(state % self.ncol + d_col, 0), self.ncol - 1)
        return row * self.ncol + col


def make_env(cfg):
    return FrozenLake(MAPS[cfg.map], cfg.slippery, TIME_LIMITS[cfg.map])


# -----------------------------------------------------------------------------------------------
# Exact analysis: value iteration, the optimal policy matrix, goal and visit probabilities


def value_iteration(env, discount, tol=1e-12, max_iters=100_000):
    """V*(s) and Q*(s, a): Q(s, a) = R(s, a) + discount * sum_s' C(s, a, s') V(s'), V = max_a Q,
    R the chance of entering G, C that of moving on to a non-terminal state (choice 2)."""
    live = ~env.terminal  # (S,) bool
    R = env.K[:, :, env.goal].sum(axis=-1) * live[:, None]  # (S, A)
    C = env.K * live[:, None, None] * live[None, None, :]  # (S, A, S)
    V = np.zeros(env.n_states)  # (S,)
    for _ in range(max_iters):
        V, V_old = (R + discount * C @ V).max(axis=1), V  # Q (S, A) -> V (S,)
        if np.abs(V - V_old).max() < tol:
            break
    return V, R + discount * C @ V


def optimal_policy_matrix(Q, tol=1e-9):
    """pi*(a|s) = 1/|A*(s)| on the optimal actions A*(s), 0 elsewhere (choice 2): uniform on
    holes and the goal (every action is worth 0) and on states that cannot reach G. Two-routes
    has one tie, at row 0 col 2 (back or on: 8 moves to G either way); dead-end has none."""
    best = Q >= Q.max(axis=1, keepdims=True) - tol  # (S, A) bool
    return best / best.sum(axis=1, keepdims=True)  # (S, A)


def goal_probability(env, pi, horizon):
    """P(G is entered within `horizon` steps from the start), actions sampled from pi: holes and
    G loop onto themselves, so it is the mass sitting on G after `horizon` steps."""
    M = np.einsum("sa,sat->st", pi, env.K)  # (S, S) one step of the chain pi induces
    d = env.p0 @ np.linalg.matrix_power(M, horizon)  # (S,)
    return float(d[env.goal].sum())


def visit_probabilities(env, pi, horizon):
    """h[g] = P(state g is entered within `horizon` steps), for every g at once. Row g of D is the
    chain's state distribution less the mass that has hit g: each step, the mass arriving on g
    is added to h[g] and taken out of the chain."""
    M = np.einsum("sa,sat->st", pi, env.K)  # (S, S)
    D = np.tile(env.p0, (env.n_states, 1))  # (S, S) row g: the chain for target g
    idx = np.arange(env.n_states)
    h = D[idx, idx].copy()  # (S,) the start is visited at step 0
    D[idx, idx] = 0.0
    for _ in range(horizon):
        D = D @ M
        h += D[idx, idx]
        D[idx, idx] = 0.0
    return h


# -----------------------------------------------------------------------------------------------
# The two routes: the data (choice 3)


@dataclass
class Route:
    states: list  # s_0 .. s_T: the start, ..., the goal or, on dead-end, a hole
    actions: list  # a_0 .. a_{T-1}: the intended moves


# Why dead-end: on a deterministic grid pi* takes exactly the moves that shorten the distance to
# G, so a route of T moves from S to G disagrees with it on (T - d(S)) / 2 of them, fewer than
# half (two-routes: T = 10, d(S) = 6: 2). A route pi* rejects move by move must end in a hole.
def two_routes(env, rejected_moves):
    """(optimal, sub-optimal) routes: the shortest route to G, by a breadth-first search around
    the holes (ties go to the lower action index), and the walk of rejected_moves."""
    queue, seen = deque([Route([env.start], [])]), {env.start}
    while queue and env.letters[queue[0].states[-1]] != "G":
        route = queue.popleft()
        for a in range(env.n_actions):
            nxt = env.move(route.states[-1], a)
            if nxt not in seen and env.letters[nxt] != "H":
                seen.add(nxt)
                queue.append(Route(route.states + [nxt], route.actions + [a]))
    if not queue:
        raise UserError("--map: the goal cannot be reached from the start; pick another map "
                        "or open a way through its holes in MAPS")
    walked = Route([env.start], [ACTION_LETTERS.index(m) for m in rejected_moves])
    for a in walked.actions:
        walked.states.append(env.move(walked.states[-1], a))
    return queue[0], walked


def route_return(route, discount, env):
    """Discounted return of walking a route: reward 1 on its last move if that enters G, else 0."""
    return discount ** (len(route.actions) - 1) * (env.letters[route.states[-1]] == "G")


# -----------------------------------------------------------------------------------------------
# Policies and data
# Shapes: B = trajectories in a batch (1 here: one chosen, one rejected route), T = moves in a
# trajectory, S = states, A = 4 actions.


def make_policy(family, n_states, hidden):
    """A policy maps a (soft) one-hot state x(s) of shape (..., S) to action logits (..., A)
    (choice 5); float64, so that probabilities near 1 keep ORPO's odds p / (1 - p) finite."""
    if family == "tabular":  # logits = W x(s) = column s of W (A, S): a logit vector per state
        return nn.Linear(n_states, 4, bias=False, dtype=torch.float64)
    # the paper's two-layer fully connected net; W1 x(s) is the embedding of state s
    return nn.Sequential(nn.Linear(n_states, hidden, dtype=torch.float64), nn.ReLU(),
                         nn.Linear(hidden, 4, dtype=torch.float64))


def policy_matrix(policy, n_states):
    """pi(a|s) for every state, as a numpy (S, A) matrix."""
    with torch.no_grad():
        return torch.softmax(policy(torch.eye(n_states, dtype=torch.float64)), dim=-1).numpy()


class Demonstrations:
    """Each route as (states where the moves are made, moves), (1, T) tensors; move_table (S, A):
    the state each intended move leads to; x (S, S): row s, the policies' input x(s) (choice 5)."""

    def __init__(self, env, chosen, rejected):
        self.chosen, self.rejected = [(torch.tensor([r.states[:-1]]), torch.tensor([r.actions]))
                                      for r in (chosen, rejected)]
        self.move_table = torch.tensor([[env.move(s, a) for a in range(env.n_actions)]
                                        for s in range(env.n_states)])
        self.x = torch.eye(env.n_states, dtype=torch.float64)


# -----------------------------------------------------------------------------------------------
# Log-probs and the four losses
# A language model's answer is a sequence of tokens; here a route is a sequence of actions, and
# the state s_t plays the part of the context "prompt + the first t tokens" (choice 7).


def step_logps(policy, inputs, actions):
    """log pi(a_t | x_t) of the given actions at every step: the helper all four losses use."""
    logps = F.log_softmax(policy(inputs), dim=-1)  # (B, T, A)
    return logps.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, T)


def route_logps(policy, demos):
    """log pi(route) = sum_t log pi(a_t | s_t) of the chosen and the rejected route: (1,), (1,)."""
    return tuple(step_logps(policy, demos.x[states], actions).sum(dim=-1)
                 for states, actions in (demos.chosen, demos.rejected))


def sft_route_loss(policy, demos, ref, cfg):
    """SFT: the mean NLL of the optimal route's actions given its true states (teacher forcing)."""
    states, actions = demos.chosen  # (1, T) each
    logps = step_logps(policy, demos.x[states], actions)  # (1, T)
    return -logps.mean(dim=-1).mean()  # mean over steps, then over trajectories


def dpo_route_loss(policy, demos, ref, cfg):
    """DPO, chosen = the optimal route, rejected = the other (the paper's section 3): ift.dpo_loss
    on the routes' summed log-probs. A move both routes make cancels out. ref: the starting
    policy's route log-probs, computed once (choice 6)."""
    loss, _ = dpo_loss(*route_logps(policy, demos), *ref, beta=cfg.dpo_beta)
    return loss


def orpo_route_loss(policy, demos, ref, cfg):
    """ORPO: SFT on the optimal route - beta * log sigmoid(log odds(chosen) - log odds(rejected)),
    odds(y) = p / (1 - p) with p = exp(mean log-prob per move): ift.orpo_loss. No reference."""
    lengths = [torch.tensor([actions.shape[1]], dtype=torch.float64)  # (1,) each
               for _, actions in (demos.chosen, demos.rejected)]
    loss, _ = orpo_loss(*route_logps(policy, demos), *lengths, beta=cfg.orpo_beta)
    return loss


# IFT at the trajectory level (the paper's Algorithm 1, eq. 17 and eq. 21; ift.py derives them):
# token = action a_t, the context after t tokens = the state s_t, the token's embedding = the
# policy's input x(s), one-hot (the neural policy's W1 x(s) is an embedding lookup). On the
# optimal route:
#  1. Inference one step ahead, without gradient: the greedy ahat_t = argmax_a pi(a | x(s*_t)).
#  2. Temporal residual connection (eq. 17): the "intuition" of state t is where the greedy move
#     from s*_{t-1} leads (the intended move, also on slippery ice), shat_t, mixed in as
#         x_t = (1 - lam) * x(s*_t) + lam * x(shat_t) for t >= 1;  x_0 = x(s*_0), the "prompt".
#     The mix goes through the live weights, not a frozen copy of the embedding table as in the
#     official code: for the tabular policy that table is the policy.
#  3. Step losses with gradient: l_t = -log pi(a*_t | x_t).
#  4. Relation propagation (eq. 21, ift.relation_weights): with N moves, c_t = l_t / N,
#     S_t = sum_{j>=t} gamma^(j-t) c_j, w_t = S_t * N / sum_k S_k; loss = (1/N) sum_t l_t w_t.
#     Early moves weigh more. gamma = 0 gives w_t = 1, and with lam = 0 too, SFT.


def ift_inputs(policy, demos, lam):
    """Steps 1 and 2: the optimal route's inputs with the policy's own predictions mixed in."""
    states, _ = demos.chosen  # (1, T)
    true_inputs = demos.x[states]  # (1, T, S) x(s*_t)
    with torch.no_grad():  # the greedy pass only picks states; no gradient flows through it
        greedy = policy(true_inputs).argmax(dim=-1)  # (1, T) ahat_t
    reached = demos.move_table[states[:, :-1], greedy[:, :-1]]  # (1, T-1) shat_1 ..
    inputs = true_inputs.clone()  # (1, T, S)
    inputs[:, 1:] = (1 - lam) * true_inputs[:, 1:] + lam * demos.x[reached]
    return inputs


def ift_route_loss(policy, demos, ref, cfg):
    """Steps 3 and 4: relation-weighted NLL of the optimal route on the mixed inputs."""
    inputs = ift_inputs(policy, demos, cfg.lam)  # (1, T, S)
    step_losses = -step_logps(policy, inputs, demos.chosen[1])  # (1, T) l_t
    mask = torch.ones_like(step_losses, dtype=torch.bool)  # (1, T) every move is an answer token
    weights = relation_weights(step_losses, mask, cfg.gamma, detach=cfg.detach_weights)  # (1, T)
    return ((step_losses * weights).sum(dim=-1) / mask.sum(dim=-1)).mean()  # / N


LOSSES = {"SFT": sft_route_loss, "DPO": dpo_route_loss, "ORPO": orpo_route_loss,
          "IFT": ift_route_loss}


# -----------------------------------------------------------------------------------------------
# Training and evaluation


def policy_mse(pi, pi_star, states):
    """The paper's metric: mean over the given states and all actions of (pi - pi*)^2."""
    return float(((pi - pi_star)[states] ** 2).mean())


def train(family, seed, method, cfg, env, demos, pi_star):
    """Adam on one method's loss (choice 8); returns the policy and [(step, loss, MSE)] after
    0 .. cfg.steps updates. Every method and sweep point of a seed starts from the same weights,
    PyTorch's default initialisation (choice 6): near-uniform, so only the loss differs."""
    torch.manual_seed(seed)
    policy = make_policy(family, env.n_states, cfg.hidden)
    if method == "start":  # the untrained starting policy
        return policy, []
    with torch.no_grad():
        ref = route_logps(policy, demos)  # DPO's reference: the starting policy's
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    curve = []
    for step in range(cfg.steps + 1):
        loss = LOSSES[method](policy, demos, ref, cfg)
        pi = policy_matrix(policy, env.n_states)  # (S, A)
        curve.append((step, loss.item(), policy_mse(pi, pi_star, ~env.terminal)))
        if step == cfg.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return policy, curve


def run_experiment(cfg, env, demos, pi_star, on_route):
    """Every (family, seed, method): train, then measure exactly (choice 9) the MSE on all
    non-terminal states and on and off the optimal route, P(goal) and the visit probabilities."""
    runs, curves = [], {}
    live = ~env.terminal  # (S,) bool
    for family, seed, method in product(FAMILIES, range(cfg.seeds), ("start",) + METHODS):
        t0 = time.time()
        policy, curve = train(family, seed, method, cfg, env, demos, pi_star)
        curves.setdefault((family, method), []).append(curve)
        pi = policy_matrix(policy, env.n_states)  # (S, A)
        visits = visit_probabilities(env, pi, env.max_episode_steps)  # (S,)
        visited = [int(s) for s in np.flatnonzero(visits >= cfg.visit_threshold)]
        run = {"family": family, "method": method, "seed": seed,
               "final_loss": curve[-1][1] if curve else float("nan"), "pi": pi,
               "mse": policy_mse(pi, pi_star, live),
               "mse_route": policy_mse(pi, pi_star, live & on_route),
               "mse_other": policy_mse(pi, pi_star, live & ~on_route),
               "goal_prob": goal_probability(env, pi, env.max_episode_steps),
               "visited": visited, "visits": visits, "n_visited": len(visited)}
        runs.append(run)
        loss = f"{run['final_loss']:.4f}" if curve else "-"
        print(f"{family:7s} | seed {seed} | {method:5s} | loss {loss:>6s} | "
              f"MSE {run['mse']:.4f} | P(goal) {run['goal_prob']:.3f} | "
              f"visited {run['n_visited']:2d} | {time.time() - t0:.1f}s")
    return runs, curves


def report(runs, cfg):
    """Mean and sample std over the seeds of every number per (family, method), printed as a
    table; then per family the ranking by mean MSE and which of PAPER_EXPLORERS visit more cells
    than SFT on average (choice 9), next to the paper's claims. Returns all three."""
    columns = {"mse": ("MSE (all)", 4), "mse_route": ("MSE (opt. route)", 4),
               "mse_other": ("MSE (elsewhere)", 4), "goal_prob": ("P(goal)", 3),
               "n_visited": ("visited states", 1)}
    summary = {}
    for family, method in product(FAMILIES, ("start",) + METHODS):
        group = [r for r in runs if r["family"] == family and r["method"] == method]
        summary[f"{family}/{method}"] = {
            key: dict(zip(("mean", "std"), mean_std([r[key] for r in group]))) for key in columns}
    print(f"\nresults, mean ± sample std over {cfg.seeds} seed(s) (MSE to pi*: lower is "
          f"better; visited: cells entered with probability >= {cfg.visit_threshold}):")
    print(f"{'policy':8s} {'method':6s} | " + " | ".join(f"{h:16s}" for h, _ in columns.values()))
    for key, entry in summary.items():
        family, method = key.split("/")
        print(f"{family:8s} {method:6s} | " + " | ".join(
            f"{entry[k]['mean']:.{d}f} ± {entry[k]['std']:.{d}f}".ljust(16)
            for k, (_, d) in columns.items()))
    rankings, explorers = {}, {}
    for family in FAMILIES:
        mse = {m: summary[f"{family}/{m}"]["mse"]["mean"] for m in METHODS}
        rankings[family] = sorted(METHODS, key=mse.get)
        verdict = "matches" if tuple(rankings[family]) == PAPER_ORDER else "does NOT match"
        scores = " < ".join(f"{m} {mse[m]:.4f}" for m in rankings[family])
        print(f"{family} ranking by MSE: {scores}  -> {verdict} the paper's "
              f"{' > '.join(PAPER_ORDER)}")
        visited = {m: summary[f"{family}/{m}"]["n_visited"]["mean"] for m in METHODS}
        more = [m for m in PAPER_EXPLORERS if visited[m] > visited["SFT"]]
        holds = len(more) == len(PAPER_EXPLORERS)
        explorers[family] = {"visited": visited, "more_than_sft": more, "holds": holds}
        counts = ", ".join(f"{m} {visited[m]:.1f}" for m in PAPER_EXPLORERS)
        print(f"{family} visited cells: {counts} vs SFT {visited['SFT']:.1f} -> more than "
              f"SFT: {', '.join(more) or 'none'} -> the paper's '{', '.join(PAPER_EXPLORERS)} "
              f"explore more than SFT' {'holds' if holds else 'does NOT hold'}")
    return summary, rankings, explorers


# -----------------------------------------------------------------------------------------------
# Outputs: files and figures, each path printed once written

METHOD_COLORS = {"SFT": "tab:gray", "DPO": "tab:blue", "ORPO": "tab:purple", "IFT": "tab:red"}


def save(path, content):
    """Write a dict as JSON, or a figure as a PNG, and say so."""
    if isinstance(content, dict):
        path.write_text(json.dumps(content, indent=1))
    else:
        content.savefig(path, dpi=100)
        pyplot().close(content)
    print("wrote", path)


def draw_policy(ax, env, pi, visits, title, cmap, routes=()):
    """The map (cells shaded by visit probability, holes dark, the goal gold), pi's arrows, and
    the routes, given as (line style, route) pairs."""
    image = cmap(visits.reshape(env.nrow, env.ncol))[..., :3]  # (rows, cols, RGB)
    letters = np.array([list(row) for row in env.desc])  # (rows, cols)
    image[letters == "H"], image[letters == "G"] = (0.2, 0.22, 0.3), (1.0, 0.8, 0.2)
    ax.imshow(image)
    for k in range(1, max(env.nrow, env.ncol)):  # thin white lines between the cells
        ax.axhline(k - 0.5, color="white", lw=0.8)
        ax.axvline(k - 0.5, color="white", lw=0.8)
    for offset, (style, route) in zip((0.3, -0.3), routes):  # off-centre, clear of the arrows
        rows, cols = np.divmod(route.states, env.ncol)
        ax.plot(cols + offset, rows + offset, lw=2.5, alpha=0.85, **style)
    arrows = [(s, a) for s in np.flatnonzero(~env.terminal) for a in range(env.n_actions)
              if pi[s, a] > 0.03]  # shorter arrows would be dots
    ax.quiver([s % env.ncol for s, a in arrows], [s // env.ncol for s, a in arrows],
              [0.45 * pi[s, a] * STEP[a][1] for s, a in arrows],
              [0.45 * pi[s, a] * STEP[a][0] for s, a in arrows],
              angles="xy", scale_units="xy", scale=1, width=0.018, color="black")
    for row, col in zip(*np.nonzero(np.isin(letters, ["S", "G"]))):
        ax.text(col - 0.42, row - 0.42, letters[row, col], va="top", fontweight="bold")
    ax.set_title(title, fontsize=10)
    ax.set(xticks=[], yticks=[])


def plot_policies(path, env, routes, pi_star, runs, summary, cfg):
    """The map per policy family: pi*, the starting policy and each method's learned policy."""
    plt = pyplot()
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    cmap = LinearSegmentedColormap.from_list("visits", ["white", "#6baed6"])
    methods = ("start",) + METHODS
    fig, axes = plt.subplots(len(FAMILIES), 1 + len(methods), figsize=(14.2, 5.8),
                             layout="constrained")
    styles = (dict(color="tab:green", label="optimal route (chosen)"),
              dict(color="tab:orange", ls="--", label="sub-optimal route (rejected)"))
    star_visits = visit_probabilities(env, pi_star, env.max_episode_steps)
    for row, family in enumerate(FAMILIES):
        draw_policy(axes[row, 0], env, pi_star, star_visits,
                    "optimal policy pi*\n(value iteration)", cmap, zip(styles, routes))
        axes[row, 0].set_ylabel(f"{family} policy", fontsize=11)
        for ax, method in zip(axes[row, 1:], methods):
            group = [r for r in runs if r["family"] == family and r["method"] == method]
            mse = summary[f"{family}/{method}"]["mse"]
            draw_policy(ax, env, np.mean([r["pi"] for r in group], axis=0),
                        np.mean([r["visits"] for r in group], axis=0),
                        f"{method}\nMSE {mse['mean']:.4f} ± {mse['std']:.4f}", cmap)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=2,
               frameon=False)
    fig.colorbar(plt.cm.ScalarMappable(Normalize(0, 1), cmap), ax=axes, shrink=0.6, pad=0.01,
                 label="P(cell entered within the time limit)")
    fig.suptitle(f"Frozen Lake '{cfg.map}' ({'slippery' if cfg.slippery else 'deterministic'}): "
                 f"arrows = pi(a|s), mean over {cfg.seeds} seed(s); MSE to pi* over the non-"
                 f"terminal cells (lower is better)\nshading: P(cell entered within the time "
                 f"limit); dark = hole", fontsize=11)
    save(path, fig)


def plot_curves(path, curves, cfg):
    """MSE to pi* (top, mean +- sample std) and the training loss (bottom, each seed) vs step;
    curves[family, method] holds each seed's [(step, loss, MSE)], as train returns it."""
    fig, axes = pyplot().subplots(2, len(FAMILIES), figsize=(11, 7), sharex=True)
    for col, family in enumerate(FAMILIES):
        for method in METHODS:
            steps, loss, mse = np.array(curves[family, method]).T  # (steps+1, seeds) each
            mean, std = mean_std(mse.T)  # (steps+1,) each
            color = METHOD_COLORS[method]
            axes[0, col].plot(steps[:, 0], mean, color=color, label=method)
            axes[0, col].fill_between(steps[:, 0], mean - std, mean + std, color=color, alpha=0.2)
            # losses fall over orders of magnitude: one thin line per seed on a log scale
            axes[1, col].plot(steps, loss, color=color, lw=0.8, alpha=0.7)
        axes[0, col].set(title=f"{family} policy", ylabel="MSE to pi* (non-terminal cells)")
        axes[0, col].legend()
        axes[1, col].set(ylabel="training loss (each method's own)", yscale="log",
                         xlabel="optimiser step")
    fig.suptitle(f"Frozen Lake '{cfg.map}': {cfg.seeds} seed(s), Adam lr {cfg.lr} for all methods")
    fig.tight_layout()
    save(path, fig)


# -----------------------------------------------------------------------------------------------
# Main


def make_out_dir(cfg, write_config=False):
    """--out-dir, made and found writable before any work, with config.json written first if
    write_config (the main run; the sweep leaves it alone); one line naming the fix if not."""
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if write_config:
            (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        reason = None if os.access(out, os.W_OK) else "Permission denied"
    except OSError as e:
        reason = e.strerror
    if reason:
        raise UserError(f"cannot write into --out-dir {cfg.out_dir!r}: {reason}; pass a "
                        f"folder you can write to")
    return out


def problem(cfg):
    """The experiment's set-up: the map, its two routes, V* (S,) and pi* (S, A), and the
    demonstrations (choices 1-4)."""
    env = make_env(cfg)
    chosen, rejected = two_routes(env, REJECTED_ROUTES[cfg.map])
    V, Q = value_iteration(env, cfg.discount)
    demos = Demonstrations(env, chosen, rejected)
    return env, chosen, rejected, V, optimal_policy_matrix(Q), demos


def experiment(cfg):
    """The main run: set-up, training, evaluation, report, files."""
    out = make_out_dir(cfg, write_config=True)
    print("config:", json.dumps(asdict(cfg)))
    torch.set_num_threads(1)  # tiny tensors: nothing to share out; other programs keep a core
    env, chosen, rejected, V, pi_star, demos = problem(cfg)
    print(f"map {cfg.map} ({'slippery' if cfg.slippery else 'deterministic'}, time limit "
          f"{env.max_episode_steps} steps, value-iteration discount {cfg.discount}):")
    print("\n".join("    " + " ".join(row) for row in env.desc))
    # on slippery ice pi* may disagree with the demonstrated moves (choice 4): say on how many
    for name, route in (("optimal route (chosen)", chosen), ("sub-optimal (rejected)", rejected)):
        agree = sum(pi_star[s, a] > 0 for s, a in zip(route.states, route.actions))
        moves = "".join(ACTION_LETTERS[a] for a in route.actions)
        end = "into a hole" if env.letters[route.states[-1]] == "H" else "to G"
        print(f"{name:23s}: {len(route.actions)} moves {moves} {end}, return "
              f"{route_return(route, cfg.discount, env):.4f}; pi* takes {agree} of them")
    print(f"V*(start) = {V[env.start]:.4f}; optimal P(goal) within the time limit = "
          f"{goal_probability(env, pi_star, env.max_episode_steps):.3f}")

    on_route = np.isin(np.arange(env.n_states), chosen.states)  # (S,) bool
    runs, curves = run_experiment(cfg, env, demos, pi_star, on_route)
    summary, rankings, explorers = report(runs, cfg)
    save(out / "results.json", {
        "config": asdict(cfg), "map": env.desc,
        "routes": {name: {**asdict(route), "return": route_return(route, cfg.discount, env)}
                   for name, route in (("optimal", chosen), ("suboptimal", rejected))},
        "optimal_value_at_start": float(V[env.start]), "pi_star": pi_star.tolist(),
        "summary": summary, "ranking": rankings, "paper_order": list(PAPER_ORDER),
        "visits_verdict": explorers,
        "runs": [{**r, "pi": r["pi"].tolist(), "visits": r["visits"].tolist()} for r in runs]})
    plot_policies(out / "frozen_lake.png", env, (chosen, rejected), pi_star, runs, summary, cfg)
    plot_curves(out / "frozen_lake_curves.png", curves, cfg)


def main(argv=None):
    """The command line; a UserError ends it in one line, "error: ...", with status 1."""
    cfg = parse_flags(Config, argv, check=config_problem, description=__doc__.split("\n")[0])
    t0 = time.time()
    try:
        experiment(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
