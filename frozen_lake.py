"""Frozen Lake: how close does each fine-tuning method get to the truly optimal policy?

This reproduces the explainable Frozen Lake experiment of Intuitive Fine-Tuning (IFT,
arXiv:2405.11870, v3 section 5.3, appendix B.2, figure 3). In a small grid world the optimal
policy pi* is known exactly (value iteration), so "how close did SFT, DPO, ORPO and IFT get?" has
an exact answer: the mean squared error (MSE) between the learned and the optimal
state x action probability matrices, the paper's metric. Lower is better.

    python frozen_lake.py                      # the defaults (run times: README.md)
    python frozen_lake.py --map dead-end       # the second design: a really bad rejected route
    python frozen_lake.py --slippery           # the same on slippery ice
    python frozen_lake.py --map 8x8 --seeds 3  # one of Gymnasium's own maps
    python frozen_lake.py --sweep              # + every method on an lr x beta grid
    python frozen_lake.py --help               # every option

It prints one line per run, a table (mean +- sample std over the seeds), the ranking of the
methods per policy family next to the paper's (DPO > IFT > ORPO > SFT) and whether DPO, ORPO and
IFT visit more cells than SFT (the paper's second statement), and writes into --out-dir:
config.json, results.json and results.csv (the numbers), curves.csv (loss and MSE per step),
frozen_lake.png (the policies on the map) and frozen_lake_curves.png (MSE and loss vs step).
--sweep then reruns the comparison on a grid of learning rates and betas (the section
"Sensitivity sweep" says what it reports and why it picks nothing) and adds sweep.json, sweep.csv
and frozen_lake_sweep.png (MSE vs lr).

The experiment's own map (the default, "two-routes"), S start, F frozen, H hole, G goal:

          col 0 1 2 3 4
        row 0   S F F F F      optimal route (the SFT / IFT data, DPO / ORPO chosen):
        row 1   F H H H F        S, down the left column, right along the bottom to G: 6 moves
        row 2   F H H H F      sub-optimal route (DPO / ORPO rejected):
        row 3   F H H H F        S, right along the top, down the right column, left to G:
        row 4   F F G F F        10 moves
                               Every other path falls into a hole or walks in circles.

A second design ("dead-end", --map dead-end): the same map with one more hole, at row 3 col 4.
The right-hand way to G is cut, and the rejected route is the walk into that dead end (choice 3):

          col 0 1 2 3 4
        row 0   S F F F F      optimal route (chosen): the same 6 moves
        row 1   F H H H F      sub-optimal route (rejected): S, right along the top, down the
        row 2   F H H H F        right column into the hole at row 3 col 4: 7 moves, return 0.
        row 3   F H H H H        pi* takes none of them: from every cell of it, pi* turns back.
        row 4   F F G F F

The experiment in four steps: (1) value iteration gives pi* exactly; (2) the two routes are the
data; (3) each method trains a tabular and a neural policy from the same random start; (4) the
learned policies are compared with pi* (MSE), and their goal and visit probabilities are
computed exactly from the transition table, with the time limit.

Choices made where the paper is silent (numbered; the comments below cite them as "choice N"):
 1. Map: the two-routes map above, deterministic by default (the trajectories are the data);
    the dead-end map above is a second design, where the rejected route is as bad as it can be
    (choice 3); Gymnasium's "4x4" and "8x8" maps are options. Time limit 100 steps (200 for 8x8, as
    Gymnasium registers them). Dynamics, rewards and the transition table follow Gymnasium's
    FrozenLake-v1 exactly (actions, state numbering, walls, slips, rewards, time limit).
 2. pi* comes from value iteration with discount 0.95, so a shorter route is strictly better.
    Ties are split evenly: pi*(a|s) = 1/|A*(s)| on the optimal actions A*(s). The same rule gives
    the uniform distribution on holes and the goal (every action is worth 0 there) and on
    states that cannot reach the goal. The MSE is the mean over the non-terminal states' 4
    actions: on a hole or the goal the policy decides nothing. On the two-routes map one tie
    exists, at row 0 col 2, where going back and going on are both 8 moves from the goal; on
    dead-end there is none.
 3. The routes: the optimal one is the shortest path of intended moves (ties: lower action
    index first). The sub-optimal one, on two-routes, 4x4 and 8x8, is the shortest path whose
    first move differs and which never comes back to the start (on 4x4 and 8x8 it can be just
    as short; the script prints both returns, and how many of each route's moves pi* takes).
    A route that reaches the goal cannot disagree with pi* on most of its moves (the proof is
    above two_routes), so a sub-optimal route that pi* rejects move after move must end
    elsewhere. On dead-end it is therefore fixed by the design (REJECTED_ROUTES), not searched
    for: RRRRDDD, away from G and into a hole. The paper's two trajectories go "from start to
    goal"; this one does not, which is the point of the second design.
 4. --slippery changes the dynamics behind pi*, the goal and the visit probabilities. The data
    stay the two routes walked with intended moves, so on slippery ice pi* may disagree with the
    demonstrated actions (the script prints on how many moves).
 5. Two policy families: tabular (a bias-free linear map of the one-hot state, i.e. one logit
    vector per state) and neural (the paper's two-layer fully connected net: one-hot state,
    64 ReLU units, 4 logits). float64, so that probabilities near 1 stay finite in ORPO's odds.
 6. Where training starts: PyTorch's default initialisation, the same starting weights for every
    method within a seed (the seed varies them). It is near-uniform (tabular logits within
    +-0.2), so every method starts from "knows nothing" and only the loss differs. A pre-trained
    "base" policy would add a second arbitrary choice (fitted to which noisy policy?). DPO's
    reference policy is this starting policy, its log-probs computed once.
 7. The losses are the LM losses with sequence = trajectory and token = action: SFT is the mean
    NLL over the route's moves; DPO and ORPO use summed / mean log-probs of whole routes. IFT's
    analogy (embedding = one-hot input, one-step-ahead prediction = the state the greedy action
    would reach) is derived above the IFT code below. The IFT mixing uses the live weights
    (mixing one-hot inputs = mixing rows of the first layer), not the official code's frozen
    copy of the embedding table: for the tabular policy that table is the whole policy. The
    relation weights are not detached, as in the official code (--detach-weights to detach them).
 8. Training: Adam, lr 0.05, 300 full-batch steps, for every method and both families, fixed
    before looking at the MSE (frozen_lake_curves.png shows whether training has converged;
    RESULTS.md section 6 says what it showed). The MSE is reported at the end of training; no
    hyper-parameter was searched. --sweep shows how the comparison moves with lr and beta,
    without choosing a setting from it.
 9. Extra metrics: the probability of reaching the goal within the time limit when actions are
    sampled from the learned policy, and the states it enters with probability >= 0.05 within
    the time limit ("visited"), both computed exactly. The MSE is also split into the optimal
    route's states and the other non-terminal states. The paper's "DPO, ORPO and IFT explore
    more grids than SFT" is checked per policy family on the mean number of visited cells over
    the seeds: a method explores more if its mean is larger.

References: Hua et al., arXiv:2405.11870 (v3: section 5.3, appendix B.2, figure 3; Algorithm 1,
eq. 17 and eq. 21 for IFT); ift.py (relation_weights, dpo_loss and orpo_loss, shared with the
language-model part, each under its derivation).
"""

import copy
import csv
import json
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
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


MAPS = {
    "two-routes": ["SFFFF", "FHHHF", "FHHHF", "FHHHF", "FFGFF"],
    "dead-end": ["SFFFF", "FHHHF", "FHHHF", "FHHHH", "FFGFF"],  # two-routes, right-hand way cut
    "4x4": ["SFFF", "FHFH", "FFFH", "HFFG"],
    "8x8": ["SFFFFFFF", "FFFFFFFF", "FFFHFFFF", "FFFFFHFF",
            "FFFHFFFF", "FHHFFFHF", "FHFFHFHF", "FFFHFFFG"],
}
# Time limits in steps (choice 1): 4x4 and 8x8 as Gymnasium registers them, 100 on our designs
TIME_LIMITS = {"two-routes": 100, "dead-end": 100, "4x4": 100, "8x8": 200}
# The sub-optimal route where the map's design fixes it, as intended moves from S (choice 3);
# on every other map it is searched for.
REJECTED_ROUTES = {"dead-end": "RRRRDDD"}  # along the top, down the right column into the hole
FAMILIES = ("tabular", "neural")
METHODS = ("SFT", "DPO", "ORPO", "IFT")
PAPER_ORDER = ("DPO", "IFT", "ORPO", "SFT")  # the paper's ranking, best (lowest MSE) first
PAPER_EXPLORERS = ("DPO", "ORPO", "IFT")  # the paper: they "explore more grids" than SFT


@dataclass
class Config:
    map: str = arg("two-routes", "map: the experiment's two designs, or Gymnasium's",
                   choices=list(MAPS))
    slippery: bool = arg(False, "slippery ice: intended or either perpendicular move, 1/3 each")
    seeds: int = arg(5, "number of seeds 0..seeds-1; a seed fixes the policies' starting weights")
    steps: int = arg(300, "optimiser steps per run (every method, both policy families)")
    lr: float = arg(0.05, "Adam learning rate (every method, both policy families)")
    lam: float = arg(0.2, "IFT: weight of the policy's own prediction in its input (eq. 17)")
    gamma: float = arg(0.95, "IFT: decay of relation propagation (eq. 21); 0 switches it off")
    detach_weights: bool = arg(False, "IFT: constant relation weights (the official code: not)")
    dpo_beta: float = arg(0.1, "DPO: beta, the inverse temperature of the preference")
    orpo_beta: float = arg(0.25, "ORPO: beta, the weight of the odds-ratio term")
    discount: float = arg(0.95, "value iteration: discount in [0.7, 1), < 1 so shorter routes "
                          "are better")
    hidden: int = arg(64, "neural policy: width of its hidden layer")
    visit_threshold: float = arg(0.05, "a cell counts as visited if entered with this probability")
    sweep: bool = arg(False, "after the main run, rerun it at every --sweep-* grid point")
    sweep_lrs: tuple = arg((0.01, 0.05, 0.2), "--sweep: Adam learning rates (every method)")
    sweep_dpo_betas: tuple = arg((0.1, 0.5), "--sweep: DPO betas, each at every learning rate")
    sweep_orpo_betas: tuple = arg((0.25, 1.0), "--sweep: ORPO betas, each at every learning rate")
    out_dir: str = arg("out/frozen_lake", "output folder (created if missing)")


def parse_config(argv=None):
    """The Config from the command line (one --flag per field), checked by config_problem."""
    return parse_flags(Config, argv, check=config_problem, description=__doc__.split("\n")[0])


# Upper bounds that only catch typos. The run time grows in proportion to seeds and to steps,
# and curves.csv holds a row per (family, method, seed, step).
MOST = {"seeds": 100, "steps": 100_000, "hidden": 4096}


def config_problem(cfg):
    """The first problem with a config, in one line, or None if it is fine.

    ift.parse_flags has already refused nan and inf; every range test below is written as
    "not (inside)", so a nan that got here would fail it too. --discount stays >= 0.7: the
    lower the discount, the closer the values of unequal moves far from the goal come to each
    other, until on a large slippery map they fall within pi*'s tie tolerance
    (optimal_policy_matrix) and pi* splits between moves that are not tied (RESULTS.md section 6).
    """
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("lam", "gamma"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            return f"{flag(name)} must lie in [0, 1], got {getattr(cfg, name)}"
    if not 0.0 < cfg.visit_threshold <= 1.0:
        return (f"--visit-threshold must lie in (0, 1], got {cfg.visit_threshold}: at 0 every "
                f"cell would count as visited")
    if not 0.7 <= cfg.discount < 1.0:
        return f"--discount must lie in [0.7, 1), got {cfg.discount}"
    for name in ("dpo_beta", "orpo_beta", "lr"):
        if not getattr(cfg, name) > 0.0:
            return f"{flag(name)} must be > 0, got {getattr(cfg, name)}"
    for name in ("sweep_lrs", "sweep_dpo_betas", "sweep_orpo_betas"):
        values = list(getattr(cfg, name))
        if not all(value > 0.0 for value in values):
            return f"{flag(name)} must all be > 0, got {values}"
        if len(set(values)) < len(values):  # a repeated value would be one grid point twice
            return f"{flag(name)} must not repeat a value, got {values}"
    for name, most in MOST.items():
        if getattr(cfg, name) < 1:
            return f"{flag(name)} must be >= 1, got {getattr(cfg, name)}"
        if getattr(cfg, name) > most:
            return (f"{flag(name)} must be <= {most}, got {getattr(cfg, name)}: a guard against "
                    f"typos; raise MOST in frozen_lake.py if you mean it")
    return None


# -----------------------------------------------------------------------------------------------
# Environment: Gymnasium's FrozenLake-v1 with its TimeLimit wrapper, in plain numpy

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ACTION_LETTERS = "LDRU"  # one letter per action, for printing routes


class FrozenLake:
    """FrozenLake-v1 on a map given as rows of S / F / H / G, with Gymnasium's exact semantics.

    state = row * ncol + col. A move that would leave the grid leaves the agent where it is.
    Entering G gives reward 1 and ends the episode; entering H ends it with reward 0.
    P[s][a] is the list of (prob, next_state, reward, terminated) that Gymnasium builds: on H and
    G every action gives [(1.0, s, 0.0, True)]; on slippery ice the outcomes of the moves
    (a - 1) % 4, a, (a + 1) % 4 are listed in that order, even when two of them coincide.
    reset / step return what gym.make("FrozenLake-v1") returns, with the same random numbers
    for the same seed; truncated becomes True once max_episode_steps steps have been taken.
    """

    def __init__(self, desc, slippery=False, max_episode_steps=100):
        self.desc = list(desc)
        self.nrow, self.ncol = len(desc), len(desc[0])
        self.n_states, self.n_actions = self.nrow * self.ncol, 4
        self.max_episode_steps = max_episode_steps
        letters = "".join(self.desc)
        self.start = letters.index("S")
        self.terminal = np.array([c in "GH" for c in letters])  # (S,) bool
        self.initial_state_distrib = np.array([c == "S" for c in letters], dtype=float)
        self.initial_state_distrib /= self.initial_state_distrib.sum()
        p_intended = 1.0 / 3.0  # Gymnasium's success_rate
        p_slip = (1.0 - p_intended) / 2.0  # its fail_rate, for each perpendicular move
        self.P = {s: {} for s in range(self.n_states)}
        for s in range(self.n_states):
            for a in range(self.n_actions):
                if self.terminal[s]:
                    self.P[s][a] = [(1.0, s, 0.0, True)]
                elif slippery:
                    moves = ((a - 1) % 4, a, (a + 1) % 4)
                    self.P[s][a] = [(p_intended if b == a else p_slip, *self.outcome(s, b))
                                    for b in moves]
                else:
                    self.P[s][a] = [(1.0, *self.outcome(s, a))]
        self.rng = None
        self.state = None
        self.elapsed_steps = 0

    def letter(self, state):
        return self.desc[state // self.ncol][state % self.ncol]

    def move(self, state, action):
        """The state an intended move leads to; walls clamp (bumping means staying)."""
        row, col = divmod(state, self.ncol)
        if action == LEFT:
            col = max(col - 1, 0)
        elif action == DOWN:
            row = min(row + 1, self.nrow - 1)
        elif action == RIGHT:
            col = min(col + 1, self.ncol - 1)
        elif action == UP:
            row = max(row - 1, 0)
        return row * self.ncol + col

    def outcome(self, state, action):
        """(next_state, reward, terminated) of moving from a non-terminal state."""
        next_state = self.move(state, action)
        letter = self.letter(next_state)
        return next_state, float(letter == "G"), letter in "GH"

    def sample(self, probs):
        """Gymnasium's categorical_sample: the first index whose cumulative prob exceeds u."""
        return int(np.argmax(np.cumsum(probs) > self.rng.random()))

    def reset(self, seed=None):
        if seed is not None or self.rng is None:
            self.rng = np.random.default_rng(seed)  # = Gymnasium's seeding.np_random(seed)
        self.state = self.sample(self.initial_state_distrib)
        self.elapsed_steps = 0
        return self.state, {"prob": 1}

    def step(self, action):
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        transitions = self.P[self.state][action]
        i = self.sample([prob for prob, _, _, _ in transitions])
        prob, next_state, reward, terminated = transitions[i]
        self.state = next_state
        self.elapsed_steps += 1
        truncated = self.elapsed_steps >= self.max_episode_steps
        return next_state, reward, terminated, truncated, {"prob": prob}


def make_env(cfg):
    return FrozenLake(MAPS[cfg.map], cfg.slippery, TIME_LIMITS[cfg.map])


# -----------------------------------------------------------------------------------------------
# Exact analysis: value iteration, the optimal policy matrix, goal and visit probabilities


def transition_tensor(env):
    """K[s, a, s'] = probability that action a in state s leads to s' (terminal: s' = s)."""
    K = np.zeros((env.n_states, env.n_actions, env.n_states))  # (S, A, S)
    for s in range(env.n_states):
        for a in range(env.n_actions):
            for prob, next_state, _, _ in env.P[s][a]:
                K[s, a, next_state] += prob
    return K


def value_iteration(env, discount, tol=1e-12, max_iters=100_000):
    """V*(s) and Q*(s, a) of the Bellman optimality equation, read off the transition table.

    Q(s, a) = sum over (p, s', r, done) in P[s][a] of p * (r + discount * V(s') * (not done)),
    V(s) = max_a Q(s, a). discount = 1 is allowed: V*(s) is then the best success probability.
    Starting from V = 0, k backups give the best value within k steps (tol = 0, max_iters = k).
    """
    R = np.zeros((env.n_states, env.n_actions))  # (S, A) expected immediate reward
    C = np.zeros((env.n_states, env.n_actions, env.n_states))  # (S, A, S) prob. of going on
    for s in range(env.n_states):
        for a in range(env.n_actions):
            for prob, next_state, reward, terminated in env.P[s][a]:
                R[s, a] += prob * reward
                C[s, a, next_state] += prob * (not terminated)
    V = np.zeros(env.n_states)  # (S,)
    for _ in range(max_iters):
        Q = R + discount * C @ V  # (S, A)
        V_new = Q.max(axis=1)
        converged = np.abs(V_new - V).max() < tol
        V = V_new
        if converged:
            break
    return V, R + discount * C @ V


def optimal_policy_matrix(Q, tol=1e-9):
    """pi*(a|s) = 1/|A*(s)| on the optimal actions A*(s), 0 elsewhere (choice 2)."""
    best = Q >= Q.max(axis=1, keepdims=True) - tol  # (S, A) bool
    return best / best.sum(axis=1, keepdims=True)  # (S, A)


def state_transition_matrix(env, pi):
    """M[s, s'] = sum_a pi(a|s) K[s, a, s']: one step of the chain the policy pi induces."""
    return np.einsum("sa,sat->st", pi, transition_tensor(env))  # (S, S)


def goal_probability(env, pi, horizon):
    """P(the goal is reached within `horizon` steps from the start), actions sampled from pi.

    Holes and the goal loop onto themselves, so the mass sitting on G after `horizon` steps is
    exactly the probability of having entered it by then.
    """
    M = state_transition_matrix(env, pi)  # (S, S)
    d = env.initial_state_distrib @ np.linalg.matrix_power(M, horizon)  # (S,)
    goals = np.array([env.letter(s) == "G" for s in range(env.n_states)])
    return float(d[goals].sum())


def visit_probabilities(env, pi, horizon):
    """h[g] = P(state g is entered at least once within `horizon` steps), for every g at once.

    Row g of D holds the chain's state distribution with the mass that has already hit g
    removed: every step, the mass arriving on g is added to h[g] and taken out of the chain.
    """
    M = state_transition_matrix(env, pi)  # (S, S)
    D = np.tile(env.initial_state_distrib, (env.n_states, 1))  # (S, S) row g: chain for target g
    idx = np.arange(env.n_states)
    h = D[idx, idx].copy()  # (S,) the start is visited at step 0
    D[idx, idx] = 0.0
    for _ in range(horizon):
        D = D @ M
        h += D[idx, idx]
        D[idx, idx] = 0.0
    return h


# -----------------------------------------------------------------------------------------------
# The two routes: the data


@dataclass
class Route:
    states: list  # s_0 .. s_T: the start, ..., the goal or, on dead-end, a hole (T + 1 states)
    actions: list  # a_0 .. a_{T-1}: the intended moves (T actions)


def shortest_route(env, start, banned=()):
    """The shortest path of intended moves from `start` to the goal (breadth-first search).

    It never enters a hole or a banned state and never bumps into a wall; neighbours are tried
    in action order, so ties go to the lower action index. None if the goal is unreachable.
    """
    parent = {start: None}  # state -> (previous state, action), the search tree
    queue = deque([start])
    while queue:
        s = queue.popleft()
        if env.letter(s) == "G":
            states, actions = [s], []
            while parent[s] is not None:
                s, a = parent[s]
                states.insert(0, s)
                actions.insert(0, a)
            return Route(states, actions)
        for a in range(env.n_actions):
            nxt = env.move(s, a)
            if nxt not in parent and nxt not in banned and env.letter(nxt) != "H":
                parent[nxt] = (s, a)
                queue.append(nxt)
    return None


def walk(env, moves):
    """The route of the intended moves `moves` (letters of ACTION_LETTERS) from the start."""
    states, actions = [env.start], []
    for letter in moves:
        actions.append(ACTION_LETTERS.index(letter))
        states.append(env.move(states[-1], actions[-1]))
    return Route(states, actions)


# Why a route to the goal cannot be bad move by move (choice 3). On a deterministic grid every
# move changes the distance to G (in moves, around the holes) by one, or by zero when it bumps
# into a wall, and pi* takes exactly the moves that shorten it. A route of T moves from S to G
# without wall bumps makes up the start's distance d(S) with a moves that shorten and b that
# lengthen it: a + b = T and a - b = d(S), so it disagrees with pi* on b = (T - d(S)) / 2 of its
# moves, fewer than half (two-routes: T = 10, d(S) = 6, b = 2). A sub-optimal route that pi*
# rejects on most moves must therefore end elsewhere: on dead-end, in a hole (REJECTED_ROUTES).
def two_routes(env, rejected_moves=None):
    """(optimal, sub-optimal) routes from the start (choice 3); UserError if either is missing.

    rejected_moves (e.g. "RRRRDDD") fixes the sub-optimal route; without it, it is searched for.
    """
    best = shortest_route(env, env.start)
    if best is None:
        raise UserError("--map: the goal cannot be reached from the start; pick another map "
                        "or open a way through its holes in MAPS")
    if rejected_moves is not None:
        return best, walk(env, rejected_moves)
    second = None
    for a in range(env.n_actions):
        first = env.move(env.start, a)
        if a == best.actions[0] or first == env.start or env.letter(first) == "H":
            continue
        rest = shortest_route(env, first, banned={env.start})
        if rest is not None and (second is None or len(rest.actions) + 1 < len(second.actions)):
            second = Route([env.start] + rest.states, [a] + rest.actions)
    if second is None:
        raise UserError("--map: the map has no second route from the start to the goal; "
                        "pick another map or give it a rejected route in REJECTED_ROUTES")
    return best, second


def route_return(route, discount, env):
    """Discounted return of walking a route: reward 1 on its last move if that enters G, else 0."""
    return discount ** (len(route.actions) - 1) * (env.letter(route.states[-1]) == "G")


def describe_route(route, env):
    cells = " ".join(f"({s // env.ncol},{s % env.ncol})" for s in route.states)
    if env.letter(route.states[-1]) == "H":
        cells += " = a hole"
    moves = "".join(ACTION_LETTERS[a] for a in route.actions)
    return f"{len(route.actions)} moves {moves}: {cells}"


# -----------------------------------------------------------------------------------------------
# Policies and data tensors
# Shapes: B = trajectories in a batch (always 1 here: one optimal and one sub-optimal route),
# T = moves in a trajectory, S = states, A = 4 actions.


def make_policy(family, n_states, hidden):
    """A policy maps a (soft) one-hot state x(s) of shape (..., S) to action logits (..., A)."""
    if family == "tabular":
        # logits = W x(s) = column s of W (A, S): one free logit vector per state
        return nn.Linear(n_states, 4, bias=False, dtype=torch.float64)
    # the paper's two-layer fully connected net; W1 x(s) is the embedding of state s
    return nn.Sequential(nn.Linear(n_states, hidden, dtype=torch.float64), nn.ReLU(),
                         nn.Linear(hidden, 4, dtype=torch.float64))


def starting_policy(family, seed, n_states, hidden):
    """The seed's starting weights: the same for every method and every sweep point (choice 6)."""
    torch.manual_seed(seed)
    return make_policy(family, n_states, hidden)


def one_hot(states, n_states):
    return F.one_hot(states, n_states).to(torch.float64)  # (..., S)


def policy_matrix(policy, n_states):
    """pi(a|s) for every state, as a numpy (S, A) matrix."""
    with torch.no_grad():
        logits = policy(torch.eye(n_states, dtype=torch.float64))  # (S, A)
    return torch.softmax(logits, dim=-1).numpy()


@dataclass
class Demonstrations:
    chosen_states: torch.Tensor  # (1, Tc) long: s*_0 .. s*_{Tc-1}, where the actions are taken
    chosen_actions: torch.Tensor  # (1, Tc) long: a*_0 .. a*_{Tc-1}
    rejected_states: torch.Tensor  # (1, Tr) long: the sub-optimal route's
    rejected_actions: torch.Tensor  # (1, Tr) long
    move_table: torch.Tensor  # (S, A) long: the state each intended move leads to
    n_states: int


def make_demonstrations(env, chosen, rejected):
    def row(values):
        return torch.tensor([values], dtype=torch.long)  # (1, T)

    moves = [[env.move(s, a) for a in range(env.n_actions)] for s in range(env.n_states)]
    return Demonstrations(row(chosen.states[:-1]), row(chosen.actions),
                          row(rejected.states[:-1]), row(rejected.actions),
                          torch.tensor(moves, dtype=torch.long), env.n_states)


# -----------------------------------------------------------------------------------------------
# Log-probs and the four losses
# A language model's answer is a sequence of tokens; here a route is a sequence of actions, and
# the state s_t plays the part of the context "prompt + the first t tokens" (choice 7).


def step_logps(policy, inputs, actions):
    """log pi(a_t | x_t) of the given actions at every step: the helper all four losses use."""
    logits = policy(inputs)  # (B, T, A)
    logps = F.log_softmax(logits, dim=-1)  # (B, T, A)
    return logps.gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # (B, T)


def route_logps(policy, states, actions, n_states):
    """Summed log-prob of a whole route, log pi(route) = sum_t log pi(a_t | s_t)."""
    return step_logps(policy, one_hot(states, n_states), actions).sum(dim=-1)  # (B,)


def reference_logps(policy, demos):
    """DPO's reference: the starting policy's route log-probs, computed once (choice 6)."""
    with torch.no_grad():
        chosen = route_logps(policy, demos.chosen_states, demos.chosen_actions, demos.n_states)
        rejected = route_logps(policy, demos.rejected_states, demos.rejected_actions,
                               demos.n_states)
    return chosen, rejected  # (1,), (1,)


def sft_route_loss(policy, demos, ref, cfg):
    """SFT: the mean NLL of the optimal route's actions given its true states (teacher forcing)."""
    inputs = one_hot(demos.chosen_states, demos.n_states)  # (1, T, S)
    logps = step_logps(policy, inputs, demos.chosen_actions)  # (1, T)
    return -logps.mean(dim=-1).mean()  # mean over steps, then over trajectories


def dpo_route_loss(policy, demos, ref, cfg):
    """DPO, chosen = the optimal route, rejected = the sub-optimal one (the paper's section 3).

    h = [log pi(chosen) - log pi_ref(chosen)] - [log pi(rejected) - log pi_ref(rejected)] with
    log-probs summed over the moves; loss = -log sigmoid(beta * h), computed by ift.dpo_loss.
    A move shared by both routes (same state, same action) cancels out of h.
    """
    policy_chosen_logps = route_logps(policy, demos.chosen_states, demos.chosen_actions,
                                      demos.n_states)  # (1,)
    policy_rejected_logps = route_logps(policy, demos.rejected_states, demos.rejected_actions,
                                        demos.n_states)  # (1,)
    ref_chosen_logps, ref_rejected_logps = ref
    loss, _ = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                       ref_rejected_logps, beta=cfg.dpo_beta)
    return loss


def orpo_route_loss(policy, demos, ref, cfg):
    """ORPO: SFT on the optimal route - beta * log sigmoid(log odds(chosen) - log odds(rejected)).

    odds(y) = p / (1 - p), p = exp(mean log-prob per move) of the route; ift.orpo_loss computes
    it from the summed log-probs and the route lengths (the paper's section 3). No reference.
    """
    policy_chosen_logps = route_logps(policy, demos.chosen_states, demos.chosen_actions,
                                      demos.n_states)  # (1,)
    policy_rejected_logps = route_logps(policy, demos.rejected_states, demos.rejected_actions,
                                        demos.n_states)  # (1,)
    chosen_lengths = torch.tensor([demos.chosen_actions.shape[1]], dtype=torch.float64)  # (1,)
    rejected_lengths = torch.tensor([demos.rejected_actions.shape[1]], dtype=torch.float64)
    loss, _ = orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths,
                        rejected_lengths, beta=cfg.orpo_beta)
    return loss


# IFT at the trajectory level (the paper's Algorithm 1, eq. 17 and eq. 21; ift.py derives them).
# The analogy: token = action a_t; the context after t tokens = the state s_t; the token's
# embedding = the policy's input, the one-hot x(s) (the neural policy's first layer W1 x(s) is an
# embedding lookup; the tabular policy is the linear map W x(s)). On the optimal route,
#  1. Inference one step ahead (Algorithm 1 step 1), without gradient: the greedy action at
#     every true state, ahat_t = argmax_a pi(a | x(s*_t)).
#  2. Temporal residual connection (eq. 17): the model's "intuition" of state t is the state
#     its greedy action from s*_{t-1} would reach, shat_t = move(s*_{t-1}, ahat_{t-1}) (the
#     intended move, also on slippery ice). It is mixed into the input of step t:
#         x_t = (1 - lam) * x(s*_t) + lam * x(shat_t)     for t >= 1,
#         x_0 = x(s*_0)                                   (the "prompt" stays unchanged).
#     lam = 0 is teacher forcing, i.e. SFT's inputs.
#  3. Step losses against the demonstrated actions, with gradient: l_t = -log pi(a*_t | x_t).
#  4. Relation propagation (eq. 21 as Algorithm 1 and the official code compute it; the code is
#     in ift.relation_weights): with N moves, c_t = l_t / N, S_t = sum_{j>=t} gamma^(j-t) c_j,
#     w_t = S_t * N / sum_k S_k; loss = (1/N) sum_t l_t w_t. Early moves, whose mistakes lead
#     everything after them astray, weigh more. gamma = 0 gives w_t = 1: with lam = 0, SFT.
# In code: x(s) -> one_hot, ahat -> greedy, shat -> reached, x_t -> inputs, l_t -> step_losses,
# w_t -> weights.


def ift_inputs(policy, demos, lam):
    """Steps 1 and 2: the optimal route's inputs with the policy's own predictions mixed in."""
    true_inputs = one_hot(demos.chosen_states, demos.n_states)  # (1, T, S) x(s*_t)
    with torch.no_grad():  # the greedy pass only picks states; no gradient flows through it
        greedy = policy(true_inputs).argmax(dim=-1)  # (1, T) ahat_t
    reached = demos.move_table[demos.chosen_states[:, :-1], greedy[:, :-1]]  # (1, T-1) shat_1..
    inputs = true_inputs.clone()  # (1, T, S)
    inputs[:, 1:] = (1 - lam) * true_inputs[:, 1:] + lam * one_hot(reached, demos.n_states)
    return inputs


def ift_route_loss(policy, demos, ref, cfg):
    """Steps 3 and 4: relation-weighted NLL of the optimal route on the mixed inputs."""
    inputs = ift_inputs(policy, demos, cfg.lam)  # (1, T, S)
    step_losses = -step_logps(policy, inputs, demos.chosen_actions)  # (1, T) l_t
    mask = torch.ones_like(step_losses, dtype=torch.bool)  # (1, T) every move is an answer token
    weights = relation_weights(step_losses, mask, cfg.gamma, detach=cfg.detach_weights)  # (1, T)
    n_moves = mask.sum(dim=-1)  # (1,) N
    return ((step_losses * weights).sum(dim=-1) / n_moves).mean()


LOSSES = {"SFT": sft_route_loss, "DPO": dpo_route_loss, "ORPO": orpo_route_loss,
          "IFT": ift_route_loss}


# -----------------------------------------------------------------------------------------------
# Training


def train(policy, method, demos, ref, pi_star, nonterminal, cfg):
    """Adam on one method's loss; returns [(step, loss, MSE)] after 0 .. cfg.steps updates."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    curve = []
    for step in range(cfg.steps + 1):
        loss = LOSSES[method](policy, demos, ref, cfg)
        curve.append((step, loss.item(), policy_mse(policy_matrix(policy, demos.n_states),
                                                     pi_star, nonterminal)))
        if step == cfg.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return curve


# -----------------------------------------------------------------------------------------------
# Evaluation


def policy_mse(pi, pi_star, states):
    """The paper's metric: mean over the given states and all actions of (pi - pi*)^2."""
    return float(((pi - pi_star)[states] ** 2).mean())


def evaluate(pi, env, pi_star, on_route, cfg):
    """MSE (all non-terminal states, the optimal route's, the others'), P(goal), visits."""
    nonterminal = ~env.terminal  # (S,) bool
    visits = visit_probabilities(env, pi, env.max_episode_steps)  # (S,)
    return {
        "mse": policy_mse(pi, pi_star, nonterminal),
        "mse_route": policy_mse(pi, pi_star, nonterminal & on_route),
        "mse_other": policy_mse(pi, pi_star, nonterminal & ~on_route),
        "goal_prob": goal_probability(env, pi, env.max_episode_steps),
        "visited": [int(s) for s in np.flatnonzero(visits >= cfg.visit_threshold)],
        "visits": visits,
    }


def summarize(runs):
    """Mean and sample std over seeds (mean_std) of every number, per (family, method)."""
    summary = {}
    for family in FAMILIES:
        for method in ("start",) + METHODS:
            group = [r for r in runs if r["family"] == family and r["method"] == method]
            entry = {}
            for key in ("mse", "mse_route", "mse_other", "goal_prob", "n_visited"):
                mean, std = mean_std([r[key] for r in group])
                entry[key] = {"mean": float(mean), "std": float(std)}
            summary[f"{family}/{method}"] = entry
    return summary


def ranking(summary, family):
    """The four methods of a family, best (lowest mean MSE) first."""
    return sorted(METHODS, key=lambda m: summary[f"{family}/{m}"]["mse"]["mean"])


def visits_verdict(summary, family):
    """Mean visited cells per method; which of PAPER_EXPLORERS visit more than SFT (choice 9)."""
    visited = {m: summary[f"{family}/{m}"]["n_visited"]["mean"] for m in METHODS}
    more = [m for m in PAPER_EXPLORERS if visited[m] > visited["SFT"]]
    return {"visited": visited, "more_than_sft": more,
            "holds": len(more) == len(PAPER_EXPLORERS)}


def print_table(summary):
    def cell(entry, key, digits):
        return f"{entry[key]['mean']:.{digits}f} ± {entry[key]['std']:.{digits}f}"

    print(f"{'policy':8s} {'method':6s} | {'MSE (all)':15s} | {'MSE (opt. route)':16s} | "
          f"{'MSE (elsewhere)':15s} | {'P(goal)':13s} | visited states")
    for key, entry in summary.items():
        family, method = key.split("/")
        print(f"{family:8s} {method:6s} | {cell(entry, 'mse', 4):15s} | "
              f"{cell(entry, 'mse_route', 4):16s} | {cell(entry, 'mse_other', 4):15s} | "
              f"{cell(entry, 'goal_prob', 3):13s} | {cell(entry, 'n_visited', 1)}")


# -----------------------------------------------------------------------------------------------
# Sensitivity sweep (--sweep)
# "A baseline left untuned is worth nothing", but choosing each method's lr by the MSE reported
# here would tune on the test metric: this experiment has no separate validation set. So the
# sweep chooses nothing. It reruns the comparison at every point of a small grid, with the same
# seeds and starting policies as the main run, and reports all of it. Per policy family:
#  (a) the ranking at each lr, every method at that lr (as in the main run);
#  (b) each method's best MSE anywhere on the grid: an "oracle", chosen on the reported metric
#      itself, so a bound on what tuning could buy, not a result;
#  (c) at how many grid points (lr, DPO beta, ORPO beta) the paper's order DPO > IFT > ORPO > SFT
#      holds, every method at that lr.
# SFT and IFT have no beta, so one run of theirs per lr serves every (DPO beta, ORPO beta) pair.
# In code: a row is one (family, method, lr, beta), with beta None for SFT and IFT.


def sweep_variants(cfg):
    """The (method, beta) pairs trained at each lr, in METHODS order."""
    betas = {"DPO": cfg.sweep_dpo_betas, "ORPO": cfg.sweep_orpo_betas}
    return [(method, beta) for method in METHODS for beta in betas.get(method, [None])]


def variant_label(method, beta):
    return method if beta is None else f"{method}(beta {beta:g})"


def point_label(row):
    return f"lr {row['lr']:g}" + ("" if row["beta"] is None else f", beta {row['beta']:g}")


def run_sweep(cfg, env, demos, pi_star):
    """Final MSE of every (family, method, lr, beta) on every seed; one line per row."""
    rows = []
    for family in FAMILIES:
        for lr in cfg.sweep_lrs:
            for method, beta in sweep_variants(cfg):
                t0 = time.time()
                run_cfg = replace(cfg, lr=lr)
                if method == "DPO":
                    run_cfg = replace(run_cfg, dpo_beta=beta)
                elif method == "ORPO":
                    run_cfg = replace(run_cfg, orpo_beta=beta)
                mses = []
                for seed in range(cfg.seeds):
                    policy = starting_policy(family, seed, env.n_states, cfg.hidden)
                    ref = reference_logps(policy, demos)
                    curve = train(policy, method, demos, ref, pi_star, ~env.terminal, run_cfg)
                    mses.append(curve[-1][2])  # the MSE after the last step, as in the main run
                mean, std = mean_std(mses)
                row = {"family": family, "method": method, "lr": lr, "beta": beta,
                       "mse_mean": float(mean), "mse_std": float(std), "mse_seeds": mses}
                rows.append(row)
                print(f"sweep | {family:7s} | lr {lr:<5g} | {variant_label(method, beta):16s} | "
                      f"MSE {row['mse_mean']:.4f} ± {row['mse_std']:.4f} | "
                      f"{time.time() - t0:.1f}s")
    return rows


def print_sweep_table(rows, cfg):
    """One line per (family, method, beta), one column per lr: MSE, mean ± sample std."""
    print(f"\nsweep: MSE to pi* after {cfg.steps} steps, mean ± sample std over {cfg.seeds} "
          f"seed(s) (main run: lr {cfg.lr:g}, DPO beta {cfg.dpo_beta:g}, ORPO beta "
          f"{cfg.orpo_beta:g})")
    print(f"{'policy':8s} {'method':16s} | "
          + " | ".join(f"{f'lr {lr:g}':15s}" for lr in cfg.sweep_lrs))
    for family in FAMILIES:
        for method, beta in sweep_variants(cfg):
            cells = [f"{r['mse_mean']:.4f} ± {r['mse_std']:.4f}" for r in rows
                     if (r["family"], r["method"], r["beta"]) == (family, method, beta)]
            print(f"{family:8s} {variant_label(method, beta):16s} | " + " | ".join(cells))


def sweep_verdicts(rows, cfg):
    """(a), (b) and (c) above for each family, printed; returned as a dict for sweep.json."""
    verdicts = {}
    for family in FAMILIES:
        rows_f = [r for r in rows if r["family"] == family]
        ranking_at_lr = {}  # (a)
        for lr in cfg.sweep_lrs:
            order = sorted((r for r in rows_f if r["lr"] == lr), key=lambda r: r["mse_mean"])
            ranking_at_lr[f"{lr:g}"] = [[variant_label(r["method"], r["beta"]), r["mse_mean"]]
                                        for r in order]
            print(f"sweep {family} ranking at lr {lr:g}: " + " < ".join(
                f"{label} {mse:.4f}" for label, mse in ranking_at_lr[f"{lr:g}"]))
        best = [min((r for r in rows_f if r["method"] == method), key=lambda r: r["mse_mean"])
                for method in METHODS]
        oracle = sorted(best, key=lambda r: r["mse_mean"])  # (b)
        verdict = ("matches" if tuple(r["method"] for r in oracle) == PAPER_ORDER
                   else "does NOT match")
        print(f"sweep {family} oracle (each method's best grid point, CHOSEN ON THE REPORTED MSE; "
              f"reference only): " + " < ".join(
                  f"{r['method']} {r['mse_mean']:.4f} ({point_label(r)})" for r in oracle)
              + f"  -> {verdict} the paper's order")
        mse = {(r["method"], r["lr"], r["beta"]): r["mse_mean"] for r in rows_f}
        grid = list(product(cfg.sweep_lrs, cfg.sweep_dpo_betas, cfg.sweep_orpo_betas))
        holds = []  # (c) the grid points where the paper's order holds
        for lr, dpo_beta, orpo_beta in grid:
            beta = {"SFT": None, "DPO": dpo_beta, "ORPO": orpo_beta, "IFT": None}
            order = sorted(METHODS, key=lambda m: mse[(m, lr, beta[m])])
            if tuple(order) == PAPER_ORDER:
                holds.append({"lr": lr, "dpo_beta": dpo_beta, "orpo_beta": orpo_beta})
        print(f"sweep {family} paper's order {' > '.join(PAPER_ORDER)} holds at {len(holds)} of "
              f"{len(grid)} grid points (lr x DPO beta x ORPO beta)")
        for h in holds:
            print(f"    at lr {h['lr']:g}, DPO beta {h['dpo_beta']:g}, "
                  f"ORPO beta {h['orpo_beta']:g}")
        verdicts[family] = {"ranking_at_lr": ranking_at_lr, "oracle": oracle,
                            "paper_order_holds_at": holds, "grid_points": len(grid)}
    return verdicts


# -----------------------------------------------------------------------------------------------
# Plots

METHOD_COLORS = {"SFT": "tab:gray", "DPO": "tab:blue", "ORPO": "tab:purple",
                 "IFT": "tab:red"}
ARROW = {LEFT: (-1, 0), DOWN: (0, 1), RIGHT: (1, 0), UP: (0, -1)}  # (d col, d row) on screen


def draw_policy(ax, env, pi, visits, title, cmap, routes=()):
    """The map (holes dark, goal gold, cells shaded by visit probability), pi's arrows, routes."""
    image = np.zeros((env.nrow, env.ncol, 3))  # (rows, cols, RGB)
    for s in range(env.n_states):
        color = {"H": (0.2, 0.22, 0.3), "G": (1.0, 0.8, 0.2)}.get(env.letter(s))
        image[s // env.ncol, s % env.ncol] = color or cmap(visits[s])[:3]
    ax.imshow(image, extent=(-0.5, env.ncol - 0.5, env.nrow - 0.5, -0.5))
    for k in range(1, max(env.nrow, env.ncol)):  # thin white lines between the cells
        ax.axhline(k - 0.5, color="white", lw=0.8)
        ax.axvline(k - 0.5, color="white", lw=0.8)
    for offset, (style, route) in zip((0.3, -0.3), routes):  # off-centre, clear of the arrows
        cols = [s % env.ncol + offset for s in route.states]
        rows = [s // env.ncol + offset for s in route.states]
        ax.plot(cols, rows, lw=2.5, alpha=0.85, solid_capstyle="round", **style)
    xs, ys, us, vs = [], [], [], []
    for s in np.flatnonzero(~env.terminal):
        for a in range(env.n_actions):
            if pi[s, a] > 0.03:  # shorter arrows would be dots
                dx, dy = ARROW[a]
                xs.append(s % env.ncol)
                ys.append(s // env.ncol)
                us.append(0.45 * pi[s, a] * dx)
                vs.append(0.45 * pi[s, a] * dy)
    ax.quiver(xs, ys, us, vs, angles="xy", scale_units="xy", scale=1, width=0.018,
              color="black")
    for s in np.flatnonzero([env.letter(s) in "SG" for s in range(env.n_states)]):
        ax.text(s % env.ncol - 0.42, s // env.ncol - 0.42, env.letter(s), ha="left", va="top",
                fontsize=9, fontweight="bold")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_policies(path, env, routes, pi_star, runs, summary, cfg):
    """The map per policy family: pi*, the starting policy and each method's learned policy."""
    plt = pyplot()
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    visit_cmap = LinearSegmentedColormap.from_list("visits", ["white", "#6baed6"])
    columns = ("pi*", "start") + METHODS
    fig, axes = plt.subplots(len(FAMILIES), len(columns), squeeze=False, layout="constrained",
                             figsize=(2.2 * len(columns) + 1.0, 2.5 * len(FAMILIES) + 0.8))
    star_visits = visit_probabilities(env, pi_star, env.max_episode_steps)
    for row, family in enumerate(FAMILIES):
        for col, method in enumerate(columns):
            ax = axes[row, col]
            if method == "pi*":
                draw_policy(ax, env, pi_star, star_visits, "optimal policy pi*\n(value iteration)",
                            visit_cmap, routes)
                ax.set_ylabel(f"{family} policy", fontsize=11)
                continue
            group = [r for r in runs if r["family"] == family and r["method"] == method]
            mse = summary[f"{family}/{method}"]["mse"]
            draw_policy(ax, env, np.mean([r["pi"] for r in group], axis=0),
                        np.mean([r["visits"] for r in group], axis=0),
                        f"{method}\nMSE {mse['mean']:.4f} ± {mse['std']:.4f}", visit_cmap)
    handles = [line for line in axes[0, 0].get_lines() if line.get_label()[0] != "_"]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    fig.colorbar(plt.cm.ScalarMappable(Normalize(0, 1), visit_cmap),
                 ax=axes, shrink=0.6, pad=0.01, label="P(cell entered within the time limit)")
    dynamics = "slippery" if cfg.slippery else "deterministic"
    fig.suptitle(f"Frozen Lake '{cfg.map}' ({dynamics}): arrows = pi(a|s), mean over {cfg.seeds} "
                 f"seed(s); MSE to pi* over the non-terminal cells (lower is better)\n"
                 f"shading: P(cell entered within the time limit); dark = hole", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(path, curves, cfg):
    """MSE to pi* (top, mean +- sample std) and the training loss (bottom, each seed) vs step."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(FAMILIES), figsize=(11, 7), sharex=True, squeeze=False)
    for col, family in enumerate(FAMILIES):
        for method in METHODS:
            rows = [c for c in curves if c["family"] == family and c["method"] == method]
            steps = np.arange(cfg.steps + 1)
            # rows run seed by seed, step 0 .. cfg.steps within a seed
            mse = np.array([c["mse"] for c in rows]).reshape(cfg.seeds, -1)  # (seeds, steps+1)
            loss = np.array([c["loss"] for c in rows]).reshape(cfg.seeds, -1)  # (seeds, steps+1)
            color = METHOD_COLORS[method]
            mean, std = mean_std(mse)  # (steps+1,) each
            axes[0, col].plot(steps, mean, color=color, label=method)
            axes[0, col].fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
            # losses fall over orders of magnitude: one thin line per seed on a log scale
            axes[1, col].plot(steps, loss.T, color=color, lw=0.8, alpha=0.7)
        axes[0, col].set_title(f"{family} policy")
        axes[0, col].set_ylabel("MSE to pi* (non-terminal cells)")
        axes[1, col].set_ylabel("training loss (each method's own)")
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("optimiser step")
        axes[0, col].legend()
    fig.suptitle(f"Frozen Lake '{cfg.map}': {cfg.seeds} seed(s), Adam lr {cfg.lr} for all methods")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(path, rows, start_mse, cfg):
    """MSE vs lr per method and beta (mean, error bar = sample std), a panel per family."""
    plt = pyplot()
    variants = sweep_variants(cfg)
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(11, 4.6), squeeze=False)
    for col, family in enumerate(FAMILIES):
        ax = axes[0, col]
        for k, (method, beta) in enumerate(variants):
            group = [r for r in rows
                     if (r["family"], r["method"], r["beta"]) == (family, method, beta)]
            nth_beta = [b for m, b in variants if m == method].index(beta)
            dodge = 1.04 ** (k - (len(variants) - 1) / 2)  # shift sideways: bars do not overlap
            ax.errorbar([r["lr"] * dodge for r in group], [r["mse_mean"] for r in group],
                        yerr=[r["mse_std"] for r in group], color=METHOD_COLORS[method],
                        ls=("-", "--", ":", "-.")[nth_beta % 4], marker="o", ms=4, capsize=3,
                        label=variant_label(method, beta))
        ax.axhline(start_mse[family], color="black", ls=":", lw=1, label="start (untrained)")
        ax.axvline(cfg.lr, color="0.6", lw=6, alpha=0.3, zorder=0,
                   label=f"main run's lr ({cfg.lr:g})")
        ax.set_xscale("log")
        ax.set_xticks(list(cfg.sweep_lrs), [f"{lr:g}" for lr in cfg.sweep_lrs])
        ax.minorticks_off()
        ax.set_title(f"{family} policy")
        ax.set_xlabel("Adam learning rate (every method)")
        ax.set_ylabel("MSE to pi* after training (lower is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Frozen Lake '{cfg.map}': sensitivity to lr and beta, {cfg.steps} steps, "
                 f"mean ± sample std over {cfg.seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------------------------
# Main


def make_out_dir(cfg):
    """Create --out-dir and save config.json there: the first write, so a bad folder fails first."""
    try:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    except OSError as e:
        raise UserError(f"cannot write into --out-dir {cfg.out_dir!r}: {e.strerror}; pass a "
                        f"folder you can write to") from None


def set_up(cfg):
    """The environment, the two routes, V* and pi*; prints the map, the routes and V*(start)."""
    env = make_env(cfg)
    chosen, rejected = two_routes(env, REJECTED_ROUTES.get(cfg.map))
    V, Q = value_iteration(env, cfg.discount)  # (S,), (S, A)
    pi_star = optimal_policy_matrix(Q)  # (S, A)
    dynamics = "slippery" if cfg.slippery else "deterministic"
    print(f"map {cfg.map} ({env.nrow}x{env.ncol}, {dynamics}, time limit "
          f"{env.max_episode_steps} steps, value-iteration discount {cfg.discount}):")
    for row in env.desc:
        print("    " + " ".join(row))
    for name, route in (("optimal route (chosen)", chosen), ("sub-optimal (rejected)", rejected)):
        agree = sum(pi_star[s, a] > 0 for s, a in zip(route.states, route.actions))
        print(f"{name:23s}: {describe_route(route, env)}\n{'':25s}return "
              f"{route_return(route, cfg.discount, env):.4f}; pi* takes {agree} of its "
              f"{len(route.actions)} moves")
    print(f"V*(start) = {V[env.start]:.4f}; optimal P(goal) within the time limit = "
          f"{goal_probability(env, pi_star, env.max_episode_steps):.3f}")
    return env, chosen, rejected, V, pi_star


def run_experiment(cfg, env, demos, pi_star, on_route):
    """Every (family, seed, method): train from the seed's starting policy and evaluate."""
    runs, curves = [], []
    for family in FAMILIES:
        for seed in range(cfg.seeds):
            start_policy = starting_policy(family, seed, env.n_states, cfg.hidden)
            ref = reference_logps(start_policy, demos)
            for method in ("start",) + METHODS:
                t0 = time.time()
                policy = copy.deepcopy(start_policy)
                final_loss = float("nan")  # "start" is the untrained starting policy
                if method != "start":
                    curve = train(policy, method, demos, ref, pi_star, ~env.terminal, cfg)
                    curves += [{"family": family, "method": method, "seed": seed, "step": step,
                                "loss": loss, "mse": mse} for step, loss, mse in curve]
                    final_loss = curve[-1][1]
                pi = policy_matrix(policy, env.n_states)  # (S, A)
                run = {"family": family, "method": method, "seed": seed,
                       "final_loss": final_loss, "pi": pi,
                       **evaluate(pi, env, pi_star, on_route, cfg)}
                run["n_visited"] = len(run["visited"])
                runs.append(run)
                loss = "-" if method == "start" else f"{run['final_loss']:.4f}"
                print(f"{family:7s} | seed {seed} | {method:5s} | loss {loss:>6s} | "
                      f"MSE {run['mse']:.4f} | P(goal) {run['goal_prob']:.3f} | "
                      f"visited {run['n_visited']:2d} | {time.time() - t0:.1f}s")
    return runs, curves


def paper_verdicts(summary):
    """Per family, the ranking by MSE and the visits verdict, printed next to the paper's."""
    rankings = {}
    for family in FAMILIES:
        order = ranking(summary, family)
        rankings[family] = order
        verdict = "matches" if tuple(order) == PAPER_ORDER else "does NOT match"
        scores = " < ".join(f"{m} {summary[f'{family}/{m}']['mse']['mean']:.4f}" for m in order)
        print(f"{family} ranking by MSE: {scores}  -> {verdict} the paper's "
              f"{' > '.join(PAPER_ORDER)}")
    explorers = {family: visits_verdict(summary, family) for family in FAMILIES}
    for family, v in explorers.items():
        counts = ", ".join(f"{m} {v['visited'][m]:.1f}" for m in PAPER_EXPLORERS)
        verdict = "holds" if v["holds"] else "does NOT hold"
        print(f"{family} visited cells: {counts} vs SFT {v['visited']['SFT']:.1f} -> more than "
              f"SFT: {', '.join(v['more_than_sft']) or 'none'} -> the paper's "
              f"'{', '.join(PAPER_EXPLORERS)} explore more than SFT' {verdict}")
    return rankings, explorers


def write_csv(path, rows):
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(cfg, env, routes, pi_star, results, runs, curves):
    """results.json, results.csv and curves.csv (the numbers) and the two figures; paths printed."""
    out = Path(cfg.out_dir)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_csv(out / "results.csv",
              [{k: (" ".join(map(str, v)) if k == "visited" else v) for k, v in r.items()
                if k not in ("pi", "visits")} for r in runs])
    write_csv(out / "curves.csv", curves)
    chosen, rejected = routes
    plot_policies(out / "frozen_lake.png", env,
                  ((dict(color="tab:green", label="optimal route (chosen)"), chosen),
                   (dict(color="tab:orange", ls="--", label="sub-optimal route (rejected)"),
                    rejected)),
                  pi_star, runs, results["summary"], cfg)
    plot_curves(out / "frozen_lake_curves.png", curves, cfg)
    for name in ("results.json", "results.csv", "curves.csv", "frozen_lake.png",
                 "frozen_lake_curves.png"):
        print("wrote", out / name)


def main_run(cfg):
    """The main run: set-up, every method trained and evaluated, table, verdicts, outputs.

    Returns what --sweep reuses: the environment, the data, pi* and the summary.
    """
    make_out_dir(cfg)
    print("config:", json.dumps(asdict(cfg)))
    torch.set_num_threads(1)  # tiny tensors: nothing to share out, and other programs keep a core
    env, chosen, rejected, V, pi_star = set_up(cfg)
    demos = make_demonstrations(env, chosen, rejected)
    on_route = np.isin(np.arange(env.n_states), chosen.states)  # (S,) bool
    runs, curves = run_experiment(cfg, env, demos, pi_star, on_route)
    summary = summarize(runs)
    print(f"\nresults, mean ± sample std over {cfg.seeds} seed(s) (MSE to pi*: lower is "
          f"better; visited: cells entered with probability >= {cfg.visit_threshold}):")
    print_table(summary)
    rankings, explorers = paper_verdicts(summary)
    results = {
        "config": asdict(cfg),
        "map": env.desc,
        "routes": {name: {**asdict(route), "return": route_return(route, cfg.discount, env)}
                   for name, route in (("optimal", chosen), ("suboptimal", rejected))},
        "optimal_value_at_start": float(V[env.start]),
        "pi_star": pi_star.tolist(),
        "summary": summary,
        "ranking": rankings,
        "paper_order": list(PAPER_ORDER),
        "visits_verdict": explorers,
        "runs": [{**r, "pi": r["pi"].tolist(), "visits": r["visits"].tolist()} for r in runs],
    }
    write_outputs(cfg, env, (chosen, rejected), pi_star, results, runs, curves)
    return env, demos, pi_star, summary


def main_sweep(cfg, env, demos, pi_star, summary):
    """--sweep: run the grid, print the table and verdicts, write sweep.json / .csv / .png."""
    print(f"\nsweep over lr {list(cfg.sweep_lrs)}, DPO beta {list(cfg.sweep_dpo_betas)}, "
          f"ORPO beta {list(cfg.sweep_orpo_betas)}; {cfg.seeds} seed(s), {cfg.steps} steps each")
    t0 = time.time()
    rows = run_sweep(cfg, env, demos, pi_star)
    print_sweep_table(rows, cfg)
    verdicts = sweep_verdicts(rows, cfg)
    out = Path(cfg.out_dir)
    sweep = {"config": asdict(cfg), "paper_order": list(PAPER_ORDER), "rows": rows,
             "verdicts": verdicts}
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    write_csv(out / "sweep.csv",
              [{**r, "mse_seeds": " ".join(map(str, r["mse_seeds"]))} for r in rows])
    start_mse = {family: summary[f"{family}/start"]["mse"]["mean"] for family in FAMILIES}
    plot_sweep(out / "frozen_lake_sweep.png", rows, start_mse, cfg)
    for name in ("sweep.json", "sweep.csv", "frozen_lake_sweep.png"):
        print("wrote", out / name)
    print(f"sweep done in {time.time() - t0:.1f}s")


def main(argv=None):
    """The command line: the main run, then --sweep; a UserError ends it in one line, status 1."""
    cfg = parse_config(argv)
    t0 = time.time()
    try:
        env, demos, pi_star, summary = main_run(cfg)
        if cfg.sweep:
            main_sweep(cfg, env, demos, pi_star, summary)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
