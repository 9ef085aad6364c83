"""`MemoryTrainer`: gradient steps on many problems' memories at once, one forward and one backward per step.

A step over B problems (problem i: a prompt, traces with rewards, and the bank slot ``slots[i]`` it trains):

1. The B slots are copied out of the bank as leaf tensors (`MemoryBank.slot_rows`): autograd reaches
   those B slots only, never the whole bank, and never the model's weights (frozen).
2. The B prompts run once, each after its memory (`fastmem.hf.shared_prefix`): a pool with one
   slot per problem holding its memory and prompt keys/values, with the autograd graph back to the memory.
3. All traces run in one right-padded forward; trace j of problem i attends to pool slot i through
   `prefix_attention`, then to its own tokens. The op's backward sums the traces' gradients into the
   shared slot, which then flow through the prompt forward into the memory: the chain rule of the unshared
   computation (memory + prompt + trace as one sequence per trace), with the prompt part done once.
4. The loss is the sum of the problems' losses, so slot i's gradient is exactly that of problem i alone.
5. Adam, per slot, vectorized over the batch's slots; its state lives in the bank (`optimizer_state`).

Objectives, with ``logp(trace)`` the sum of its tokens' log-probabilities given memory, prompt and the
tokens before (the first token predicted from the prompt's last position):

- ``"sft"``: problem i's loss is the mean token NLL over its traces with reward 1,
  ``-sum_{j: r_j = 1} logp(trace_j) / sum_{j: r_j = 1} len(trace_j)`` (every token weighs the same).
- ``"reinforce"``: ``-sum_j A_j * logp(trace_j)`` with ``A_j = r_j - mean(r)`` over the problem's traces (group
  baseline): sequence log-probabilities summed over tokens and over traces, not averaged.

Adam's update barely depends on a constant scale of the loss, so these normalizations matter mostly
through ``eps``. Traces whose weight is 0 (sft: reward not 1; reinforce: ``A_j = 0``) are not run at all;
a problem left without any has no signal: loss 0, gradient 0, and no update (its Adam state is untouched).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from fastmem.hf.attention import check_patched
from fastmem.hf.pools import Memory
from fastmem.hf.shared_prefix import right_pad, run_after_memory, shared_prefix, token_logprobs
from fastmem.memory import MemoryBank
from fastmem.sampling import check_fits, token_row

OBJECTIVES = ("sft", "reinforce")


@dataclass(frozen=True)
class SlotGradients:
    """Losses and memory gradients of one batch, per problem i (slot ``slots[i]``).

    losses: fp32 ``[B]``. grads: parameter name -> gradient laid out like the bank's parameter with the B
    problems in place of its slots (`MemoryBank.take_slots` picks problems' rows). has_signal: bool ``[B]``; problems without
    signal have loss 0 and zero gradients. tokens: trace tokens run.
    """
    slots: Tensor
    losses: Tensor
    grads: dict[str, Tensor]
    has_signal: Tensor
    tokens: int


@dataclass(frozen=True)
class StepStats:
    """What one `MemoryTrainer.step` did.

    losses, grad_norms: per problem of the batch (0 without signal; as computed, possibly non-finite).
    updated_slots: slots that took an Adam step. nonfinite_slots: skipped, loss or gradient not finite.
    no_signal_slots: skipped, no trace with a nonzero weight. tokens: trace tokens run.
    """
    losses: list[float]
    grad_norms: list[float]
    updated_slots: list[int]
    nonfinite_slots: list[int]
    no_signal_slots: list[int]
    tokens: int


@dataclass(frozen=True)
class _Problem:
    prompt: Tensor
    traces: list[Tensor]
    weights: list[float]       # per trace; the loss is -sum_j weights[j] * logp(trace_j)

    @property
    def tokens(self) -> int:
        """Tokens its forward runs: the prompt and the traces of nonzero weight."""
        return len(self.prompt) + sum(len(trace) for trace, weight in zip(self.traces, self.weights) if weight != 0)


def _groups(items: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """``items`` split in order into consecutive groups whose sizes sum to at most ``budget`` (an item larger
    than the budget alone)."""
    groups: list[list[int]] = []
    total = budget + 1
    for item, size in zip(items, sizes):
        if total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size
    return groups


def _trace_weights(rewards: list[float], lengths: list[int], objective: str) -> list[float]:
    """Per trace, its factor in ``loss = -sum_j w_j * logp(trace_j)`` (see the module docstring)."""
    if objective == "sft":
        tokens = sum(length for reward, length in zip(rewards, lengths) if reward == 1)
        return [1 / tokens if reward == 1 else 0.0 for reward in rewards]
    baseline = sum(rewards) / len(rewards)
    return [reward - baseline for reward in rewards]


def trains_on(rewards: list[float], objective: str) -> bool:
    """Whether a problem with these trace rewards gets a gradient (some trace weight is nonzero: sft, a
    reward-1 trace; reinforce, rewards that differ)."""
    return any(_trace_weights(rewards, [1] * len(rewards), objective))


class MemoryTrainer:
    """Trains a `MemoryBank`'s slots, one slot per problem, many problems per step (module docstring).

    model: patched with `fastmem.patch`; the trainer freezes it (``requires_grad_(False)``). Put it in eval
    mode (attention dropout is refused). bank: the `MemoryBank` whose slots train. objective: "sft" or
    "reinforce". lr, betas, eps: Adam's, as `torch.optim.Adam` (no weight decay), applied per slot with
    per-slot step counts; the state is created in the bank on first use, or continued when the bank holds
    it (e.g. after `MemoryBank.load`). max_tokens: the most prompt and trace tokens one forward/backward
    holds; a step runs its problems in consecutive groups under it (a problem's gradient depends on its own
    tokens only, so the groups give each slot the same gradient, to rounding), bounding the activations a
    step keeps: on SmolLM2-135M about 1.8 MB per token in fp32 (a step over 16 problems x 8 traces of up to
    128 tokens in one pass went past 12 GB). A problem larger than max_tokens runs alone.
    """

    def __init__(self, model, bank: MemoryBank, lr: float = 1e-2, objective: str = "sft", *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_tokens: int = 2048):
        check_patched(model)
        if not isinstance(bank, MemoryBank):
            raise TypeError(f"bank must be a fastmem.MemoryBank; got {type(bank).__name__}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
        if not (lr > 0 and eps >= 0 and len(betas) == 2 and all(0 <= beta < 1 for beta in betas)):
            raise ValueError(f"need lr > 0, eps >= 0 and betas in [0, 1); got lr={lr}, betas={betas}, eps={eps}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int; got {max_tokens!r}")
        bank.validate(model)
        self.model, self.bank, self.objective = model.requires_grad_(False), bank, objective
        self.lr, self.betas, self.eps = float(lr), tuple(map(float, betas)), float(eps)
        self.max_tokens = max_tokens
        self._adam_state()

    def _adam_state(self) -> dict[str, Tensor]:
        """The bank's per-slot Adam state (created as zeros when absent): ``step [S]`` and, per parameter,
        ``exp_avg_<name>`` and ``exp_avg_sq_<name>`` shaped like it."""
        bank = self.bank
        wanted = {"step": ((bank.num_slots,), torch.long)}
        for name, parameter in bank.named_parameters():
            for moment in ("exp_avg", "exp_avg_sq"):
                wanted[f"{moment}_{name}"] = (tuple(parameter.shape), parameter.dtype)
        state = bank.optimizer_state()
        if not state:
            state = {name: torch.zeros(shape, dtype=dtype, device=bank.lengths.device)
                     for name, (shape, dtype) in wanted.items()}
            bank.set_optimizer_state(state)
        found = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        if found != wanted:
            raise ValueError(f"the bank's optimizer state {found} is not this trainer's Adam state {wanted}")
        return state

    def _checked_problems(self, prompts, traces, rewards, slots) -> tuple[list[_Problem], list[int]]:
        """Problems and their slots, every input checked (ValueError / IndexError naming the problem) before
        anything is computed."""
        if len(prompts) == 0:
            raise ValueError("empty batch: no problems")
        counts = {"prompts": len(prompts), "traces": len(traces), "rewards": len(rewards), "slots": len(slots)}
        if len(set(counts.values())) > 1:
            raise ValueError(f"prompts, traces, rewards and slots must have one entry per problem; got {counts}")
        bank, vocab_size = self.bank, self.model.config.vocab_size
        host = torch.device("cpu")   # rows stay on the host until batched (one copy per batch, not per row)
        slot_lengths = bank.lengths.tolist()
        seen: dict[int, int] = {}
        problems = []
        for i, (prompt, problem_traces, problem_rewards, slot) in enumerate(zip(prompts, traces, rewards, slots)):
            try:
                slot = operator.index(slot)
            except TypeError:
                raise ValueError(f"slot of problem {i} must be an int; got {slot!r}") from None
            if not 0 <= slot < bank.num_slots:
                raise IndexError(f"slot {slot} of problem {i} is outside [0, {bank.num_slots})")
            if slot in seen:
                raise ValueError(f"problems {seen[slot]} and {i} both train slot {slot}; a step trains each slot "
                                 "for one problem")
            seen[slot] = i
            if len(problem_traces) == 0 or len(problem_traces) != len(problem_rewards):
                raise ValueError(f"problem {i} needs at least one trace and one reward per trace; got "
                                 f"{len(problem_traces)} traces and {len(problem_rewards)} rewards")
            if not all(isinstance(r, (int, float)) and math.isfinite(r) for r in problem_rewards):
                raise ValueError(f"rewards of problem {i} must be finite numbers; got {list(problem_rewards)}")
            prompt = token_row(prompt, vocab_size, f"prompt of problem {i}", host)
            rows = [token_row(trace, vocab_size, f"trace {j} of problem {i}", host)
                    for j, trace in enumerate(problem_traces)]
            memory = slot_lengths[slot]
            for j, row in enumerate(rows):
                check_fits(self.model, memory + len(prompt) + len(row), f"trace {j} of problem {i} ({memory} "
                           f"memory + {len(prompt)} prompt + {len(row)} trace tokens)")
            weights = _trace_weights([float(r) for r in problem_rewards], [len(row) for row in rows], self.objective)
            problems.append(_Problem(prompt, rows, weights))
        return problems, list(seen)

    def gradients(self, prompts, traces, rewards, slots) -> SlotGradients:
        """Per-problem losses and memory gradients of a batch, without updating anything.

        prompts: B token-id lists. traces: per problem, a list of token-id lists (continuations of its
        prompt). rewards: per problem, a number per trace (0/1 agreement with the majority vote). slots:
        per problem, the distinct bank slot that is its memory.
        """
        problems, slots = self._checked_problems(prompts, traces, rewards, slots)
        self.bank.validate(self.model)
        device = self.bank.lengths.device
        slot_ids = torch.tensor(slots, dtype=torch.long, device=device)
        signal = [any(problem.weights) for problem in problems]
        has_signal = torch.tensor(signal, device=device)
        losses = torch.zeros(len(problems), device=device)
        grads = {name: torch.zeros_like(row) for name, row in self.bank.slot_rows(slot_ids).items()}
        active_list = [i for i, has in enumerate(signal) if has]
        if not active_list:
            return SlotGradients(slot_ids, losses, grads, has_signal, 0)
        tokens = 0
        for group in _groups(active_list, [problems[i].tokens for i in active_list], self.max_tokens):
            active = torch.tensor(group, dtype=torch.long, device=device)
            with torch.enable_grad():
                group_losses, group_grads, group_tokens = self._losses_and_grads(
                    [problems[i] for i in group], slot_ids[active])
            losses[active] = group_losses
            for name, grad in group_grads.items():
                self.bank.put_slots(grads[name], active, grad)
            tokens += group_tokens
        return SlotGradients(slot_ids, losses, grads, has_signal, tokens)

    def _losses_and_grads(self, problems: list[_Problem], slots: Tensor) -> tuple[Tensor, dict[str, Tensor], int]:
        """The shared-prefix forward and the one backward (module docstring, steps 1-4), for problems with
        signal, trace weights nonzero."""
        model, bank = self.model, self.bank
        rows = {name: row.requires_grad_() for name, row in bank.slot_rows(slots).items()}
        problem_ids = torch.arange(len(problems), device=slots.device)[:, None]
        memory = bank.memory_of(model, rows, bank.lengths[slots], problem_ids)
        prefix = shared_prefix(model, memory, [problem.prompt for problem in problems])

        kept = [(i, trace, weight) for i, problem in enumerate(problems)
                for trace, weight in zip(problem.traces, problem.weights) if weight != 0]
        owner = torch.tensor([i for i, _, _ in kept], device=slots.device)
        weights = torch.tensor([weight for _, _, weight in kept], device=slots.device)
        trace_ids, trace_lengths = (t.to(slots.device) for t in right_pad([trace for _, trace, _ in kept]))
        hidden = run_after_memory(model, Memory(prefix.pool, owner[:, None]), trace_ids)    # [R, T, hidden]
        # token t of a trace is predicted by the hidden state before it: the prompt's last one for t = 0
        predictors = torch.cat([prefix.last_hidden[owner][:, None], hidden[:, :-1]], dim=1)
        valid = torch.arange(trace_ids.shape[1], device=slots.device) < trace_lengths[:, None]
        logprobs = token_logprobs(model, predictors[valid], trace_ids[valid])
        trace_logprobs = torch.zeros(valid.shape, device=slots.device).masked_scatter(valid, logprobs).sum(dim=1)
        membership = owner == problem_ids                                     # [K, R], fixed-order sums
        losses = -(membership * (weights * trace_logprobs)).sum(dim=1)
        grads = torch.autograd.grad(losses.sum(), list(rows.values()))
        return losses.detach(), dict(zip(rows, grads)), sum(len(trace) for _, trace, _ in kept)

    def step(self, prompts, traces, rewards, slots) -> StepStats:
        """One Adam step on each problem's slot (arguments as in `gradients`).

        Only the batch's slots change, and of those only problems with signal whose loss and gradient are
        finite; every other slot (and its Adam state) keeps its bits.
        """
        result = self.gradients(prompts, traces, rewards, slots)
        bank = self.bank
        per_slot = [bank.per_slot(grad) for grad in result.grads.values()]
        finite = torch.isfinite(result.losses) & torch.stack([torch.isfinite(g).all(dim=1) for g in per_slot]).all(0)
        grad_norms = torch.stack([g.double().square().sum(dim=1) for g in per_slot]).sum(0).sqrt()
        # every figure the step reports, in one copy to the host (fp32 losses and int slot ids are exact in fp64)
        losses, norms, finite_list, signal, slot_values = torch.stack([
            result.losses.double(), grad_norms, finite.double(), result.has_signal.double(),
            result.slots.double()]).tolist()
        slot_list = [int(s) for s in slot_values]
        update_list = [i for i, (ok, has) in enumerate(zip(finite_list, signal)) if ok and has]
        if update_list:
            update = torch.tensor(update_list, dtype=torch.long, device=result.slots.device)
            self._adam(result.slots[update], {name: bank.take_slots(grad, update)
                                              for name, grad in result.grads.items()})
        return StepStats(
            losses=losses, grad_norms=norms, updated_slots=[slot_list[i] for i in update_list],
            nonfinite_slots=[s for s, ok in zip(slot_list, finite_list) if not ok],
            no_signal_slots=[s for s, has in zip(slot_list, signal) if not has],
            tokens=result.tokens)

    def _adam(self, slots: Tensor, grads: dict[str, Tensor]) -> None:
        """`torch.optim.Adam`'s update for each slot in ``slots`` (distinct), with that slot's own step count."""
        bank = self.bank
        (beta1, beta2), state = self.betas, self._adam_state()
        steps = state["step"][slots] + 1
        bias1, bias2 = 1 - beta1 ** steps.double(), 1 - beta2 ** steps.double()
        params = bank.slot_rows(slots)
        updated, moments = {}, {}
        for name, grad in grads.items():
            exp_avg = bank.take_slots(state[f"exp_avg_{name}"], slots).lerp_(grad, 1 - beta1)
            exp_avg_sq = bank.take_slots(state[f"exp_avg_sq_{name}"], slots).mul_(beta2)
            exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
            step_size = bank.along_slots((self.lr / bias1).to(grad.dtype), grad)
            denom = (exp_avg_sq.sqrt() / bank.along_slots(bias2.sqrt().to(grad.dtype), grad)).add_(self.eps)
            updated[name] = params[name] - step_size * exp_avg / denom
            moments[f"exp_avg_{name}"], moments[f"exp_avg_sq_{name}"] = exp_avg, exp_avg_sq
        bank.write_slot_rows(slots, updated)        # raises, writing nothing, if an update is not finite
        for name, value in moments.items():
            bank.put_slots(state[name], slots, value)
        state["step"].index_copy_(0, slots, steps)
