"""fastmem.MemoryTrainer on tiny random models.

Baselines: the unshared computation (each trace run as one sequence, memory + prompt + trace, under plain
`inject`, one problem at a time), the trainer on one problem at a time, and `torch.optim.Adam` on each slot
alone. fp32; relative gradient error < 2e-5.
"""
from __future__ import annotations

import pytest
import torch
from test_patch import ARCHS, KINDS, PlanCounter, make_model
from test_sampling import continuation_logprob

from fastmem import MemoryBank, patch
from fastmem.training import MemoryTrainer

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

OBJECTIVES = ["sft", "reinforce"]
RTOL = 2e-5
SLOTS = [3, 0, 4]                                  # slot 3 holds only 2 positions (see `make_bank`)
REWARDS = [[1, 0, 1], [0, 1], [1, 1, 0, 0]]


def make_bank(model, kind: str, slots: int = 5):
    torch.manual_seed(3)
    bank = KINDS[kind][0](model, slots=slots, length=4)
    bank.lengths[3] = 2
    return bank


def make_problems(seed: int = 0, rewards=REWARDS):
    """Prompts and traces of varied lengths (a one-token trace included), one problem per rewards row."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, 128, (n,), generator=generator).tolist()

    prompts = [tokens(3 + 2 * i) for i in range(len(rewards))]
    traces = [[tokens(1 + (3 * i + j) % 7) for j in range(len(row))] for i, row in enumerate(rewards)]
    return prompts, traces, [list(row) for row in rewards]


def unshared_loss_and_grads(model, bank, prompt, traces, rewards, slot, objective):
    """Problem alone, the loss of the module docstring from full sequences; gradients of slot ``slot``."""
    memory = {"bank": bank, "index": torch.tensor([slot])}
    logprobs = [continuation_logprob(model, prompt, trace, memory, 0) for trace in traces]
    if objective == "sft":
        tokens = sum(len(trace) for trace, reward in zip(traces, rewards) if reward == 1)
        loss = -sum(lp for lp, reward in zip(logprobs, rewards) if reward == 1) / tokens
    else:
        baseline = sum(rewards) / len(rewards)
        loss = -sum((reward - baseline) * lp for lp, reward in zip(logprobs, rewards))
    grads = torch.autograd.grad(loss, list(bank.parameters()))
    slot_index = torch.tensor([slot])
    return loss.detach(), {name: bank.take_slots(grad, slot_index)
                           for (name, _), grad in zip(bank.named_parameters(), grads)}


def problem_rows(grads: dict, bank, problem: int) -> dict:
    return {name: bank.take_slots(grad, torch.tensor([problem])) for name, grad in grads.items()}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def assert_frozen(model):
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def bank_tensors(bank) -> dict:
    return {name: t.detach().clone() for name, t in (*bank.named_parameters(), *bank.named_buffers())}


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_gradients_equal_the_unshared_computation(arch, kind, objective):
    model = patch(make_model(arch))
    bank = make_bank(model, kind)
    prompts, traces, rewards = make_problems()
    result = MemoryTrainer(model, bank, objective=objective).gradients(prompts, traces, rewards, SLOTS)
    assert result.has_signal.all() and result.slots.tolist() == SLOTS
    for i, slot in enumerate(SLOTS):
        loss, grads = unshared_loss_and_grads(model, bank, prompts[i], traces[i], rewards[i], slot, objective)
        assert abs(result.losses[i] - loss) <= RTOL * loss.abs().clamp(min=1)
        for name, grad in problem_rows(result.grads, bank, i).items():
            assert grad.abs().max() > 0 and relative_error(grad, grads[name]) < RTOL
    assert_frozen(model)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kind", KINDS)
def test_batched_gradients_equal_one_problem_at_a_time(kind, objective):
    model = patch(make_model("qwen3"))
    bank = make_bank(model, kind)
    trainer = MemoryTrainer(model, bank, objective=objective)
    prompts, traces, rewards = make_problems(seed=1)
    batched = trainer.gradients(prompts, traces, rewards, SLOTS)
    for i, slot in enumerate(SLOTS):
        alone = trainer.gradients(prompts[i:i + 1], traces[i:i + 1], rewards[i:i + 1], [slot])
        assert abs(batched.losses[i] - alone.losses[0]) <= RTOL * alone.losses[0].abs().clamp(min=1)
        for name, grad in problem_rows(batched.grads, bank, i).items():
            assert relative_error(grad, alone.grads[name]) < RTOL


def test_prompts_and_traces_each_plan_once_for_the_backward(monkeypatch):
    """`MemoryTrainer`: the prompts' forward and the traces' forward each hand every layer one plan, built with
    the slot-use lists the pool gradient needs."""
    model = patch(make_model("qwen3"))
    trainer = MemoryTrainer(model, make_bank(model, "prefix"), objective="sft")
    counter = PlanCounter(monkeypatch, model)
    trainer.gradients(*make_problems(), SLOTS)
    assert (len(counter.plans), counter.forwards, counter.calls) == (2, 2, 4)
    assert all(plan.slot_offsets is not None for plan in counter.plans)


@pytest.mark.parametrize("kind", KINDS)
def test_a_token_budget_splits_the_step_into_groups_with_the_same_gradients(kind, monkeypatch):
    """max_tokens small enough to run every problem alone: the same losses and gradients as one pass."""
    model = patch(make_model("llama"))
    bank = make_bank(model, kind)
    prompts, traces, rewards = make_problems(seed=2)
    whole = MemoryTrainer(model, bank).gradients(prompts, traces, rewards, SLOTS)
    passes = []
    original = MemoryTrainer._losses_and_grads
    monkeypatch.setattr(MemoryTrainer, "_losses_and_grads",
                        lambda self, problems, slots: passes.append(len(problems)) or original(self, problems, slots))
    split = MemoryTrainer(model, bank, max_tokens=1).gradients(prompts, traces, rewards, SLOTS)
    assert passes == [1] * int(whole.has_signal.sum()) and split.tokens == whole.tokens
    torch.testing.assert_close(split.losses, whole.losses, atol=0, rtol=RTOL)
    for name, grad in split.grads.items():
        assert relative_error(grad, whole.grads[name]) < RTOL
    with pytest.raises(ValueError, match="max_tokens"):
        MemoryTrainer(model, bank, max_tokens=0)


@pytest.mark.parametrize("kind", KINDS)
def test_flat_vectors_read_and_write_whole_slots_only(kind):
    """A slot's flat vector is its parameters' slices at `slot_selector`, flattened in parameter order; writing
    one slot back leaves every other slot's bits; a vector of the wrong size is refused, writing nothing."""
    bank = make_bank(patch(make_model("llama")), kind, slots=4)
    vectors = bank.read_vectors()
    expected = [torch.cat([p.detach()[bank.slot_selector(slot)].flatten().float() for p in bank.parameters()])
                for slot in range(4)]
    assert torch.equal(vectors, torch.stack(expected))
    bank.write_vectors(torch.tensor([2]), (vectors[0] * 2).double()[None])
    assert torch.equal(bank.read_vectors(torch.tensor([0, 1, 3])), vectors[[0, 1, 3]])
    torch.testing.assert_close(bank.read_vectors(torch.tensor([2]))[0], vectors[0] * 2)
    before = bank.read_vectors()
    for bad in (vectors[:1, :-1], vectors[:2], vectors[0]):
        with pytest.raises(ValueError, match=f"expected vectors \\[1, {vectors.shape[1]}\\]"):
            bank.write_vectors(torch.tensor([1]), bad)
    assert torch.equal(bank.read_vectors(), before)


@pytest.mark.parametrize("kind", KINDS)
def test_steps_are_per_slot_adam_and_leave_other_slots_bit_identical(kind):
    """Each slot follows torch.optim.Adam on that slot alone (own step count); the rest keep their bits."""
    model = patch(make_model("llama"))
    bank = make_bank(model, kind, slots=6)
    trainer = MemoryTrainer(model, bank, lr=0.05, objective="reinforce")
    alone = {slot: [bank.take_slots(p.detach(), torch.tensor([slot])).requires_grad_() for p in bank.parameters()]
             for slot in range(bank.num_slots)}
    optimizers = {slot: torch.optim.Adam(params, lr=0.05, foreach=False) for slot, params in alone.items()}
    for seed, slots in enumerate([[0, 1, 2], [2, 4, 1], [1, 0, 4]]):   # step counts differ within a batch
        prompts, traces, rewards = make_problems(seed)
        grads = trainer.gradients(prompts, traces, rewards, slots).grads
        before = bank_tensors(bank)
        stats = trainer.step(prompts, traces, rewards, slots)
        assert stats.updated_slots == slots and not stats.nonfinite_slots and not stats.no_signal_slots
        for i, slot in enumerate(slots):
            for param, grad in zip(alone[slot], problem_rows(grads, bank, i).values()):
                param.grad = grad
            optimizers[slot].step()
        for slot, params in alone.items():
            for param, expected in zip(bank.parameters(), params):
                assert torch.equal(bank.take_slots(param.detach(), torch.tensor([slot])), expected.detach())
        untouched = torch.tensor([s for s in range(bank.num_slots) if s not in slots])
        for name, tensor in bank_tensors(bank).items():
            take = (lambda t: t[untouched]) if name in ("lengths", "optimizer_step") else (
                lambda t: bank.take_slots(t, untouched))
            assert torch.equal(take(tensor), take(before[name]))
    assert bank.optimizer_state()["step"].tolist() == [2, 3, 2, 0, 2, 0]
    assert_frozen(model)


def test_a_non_finite_problem_is_skipped_and_named():
    model = patch(make_model("llama"))
    bank = make_bank(model, "soft_prompt")
    with torch.no_grad():
        bank.embeddings[0] = 3e38                 # finite, but overflows inside the model
    trainer = MemoryTrainer(model, bank)
    prompts, traces, rewards = make_problems()
    batched = trainer.gradients(prompts, traces, rewards, SLOTS)
    before = bank_tensors(bank)
    stats = trainer.step(prompts, traces, rewards, SLOTS)
    assert stats.nonfinite_slots == [0] and stats.updated_slots == [3, 4]       # problems 1, and 0 and 2
    after = bank_tensors(bank)
    assert all(torch.equal(tensor[0], before[name][0]) for name, tensor in after.items())   # slot dim 0
    assert all(not torch.equal(after["embeddings"][slot], before["embeddings"][slot]) for slot in (3, 4))
    alone = MemoryTrainer(model, make_bank(model, "soft_prompt")).gradients(prompts[::2], traces[::2], rewards[::2],
                                                                            SLOTS[::2])
    assert relative_error(batched.grads["embeddings"][::2], alone.grads["embeddings"]) < RTOL


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_problems_without_signal_are_not_updated(objective):
    model = patch(make_model("llama"))
    bank = make_bank(model, "prefix")
    prompts, traces, rewards = make_problems(rewards=[[0, 0, 0], [1, 0], [1, 1, 1, 1]])
    no_signal = [3] if objective == "sft" else [3, 4]      # sft: no reward 1; reinforce: all rewards equal
    before = bank_tensors(bank)
    stats = MemoryTrainer(model, bank, objective=objective).step(prompts, traces, rewards, SLOTS)
    assert stats.no_signal_slots == no_signal and stats.updated_slots == [s for s in SLOTS if s not in no_signal]
    for slot in no_signal:
        assert torch.equal(bank.keys[:, slot], before["keys"][:, slot])
        assert bank.optimizer_state()["step"][slot] == 0


def test_sft_steps_lower_the_loss():
    model = patch(make_model("phi3"))
    trainer = MemoryTrainer(model, make_bank(model, "soft_prompt"), lr=0.05)
    prompts, traces, rewards = make_problems()
    losses = [trainer.step(prompts, traces, rewards, SLOTS).losses for _ in range(4)]
    assert all(last < first for first, last in zip(losses[0], losses[-1]))


def test_optimizer_state_is_saved_and_continued(tmp_path):
    model = patch(make_model("gemma"))
    bank = make_bank(model, "prefix")
    trainer = MemoryTrainer(model, bank, objective="reinforce")
    prompts, traces, rewards = make_problems()
    trainer.step(prompts, traces, rewards, SLOTS)
    bank.save(tmp_path / "bank.safetensors")
    loaded = MemoryBank.load(tmp_path / "bank.safetensors", model)
    assert bank_tensors(loaded).keys() == bank_tensors(bank).keys()
    prompts, traces, rewards = make_problems(seed=5)
    for each in (bank, loaded):
        MemoryTrainer(model, each, objective="reinforce").step(prompts, traces, rewards, SLOTS)
    for name, tensor in bank_tensors(bank).items():
        assert torch.equal(tensor, bank_tensors(loaded)[name])
    assert bank.optimizer_state()["step"].tolist() == [2, 0, 0, 2, 2]


def test_bad_input_is_refused_before_any_computation():
    model = patch(make_model("llama"))
    bank = make_bank(model, "soft_prompt")
    trainer = MemoryTrainer(model, bank)
    prompts, traces, rewards = make_problems()
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    long_trace = [[list(range(3, 100)) * 3] + traces[0][1:]] + traces[1:]      # 291 tokens
    cases = [
        (ValueError, "empty batch", ([], [], [], [])),
        (ValueError, "one entry per problem", (prompts, traces, rewards, SLOTS[:2])),
        (ValueError, "problem 1 needs .* 2 traces and 1 rewards", (prompts, traces, [[1, 0, 1], [1], [1] * 4], SLOTS)),
        (IndexError, "slot 5 of problem 2 is outside", (prompts, traces, rewards, [3, 0, 5])),
        (ValueError, "problems 0 and 2 both train slot 3", (prompts, traces, rewards, [3, 0, 3])),
        (ValueError, "trace 0 of problem 0 .* more than the model's context", (prompts, long_trace, rewards, SLOTS)),
        (ValueError, "trace 1 of problem 1 is empty", (prompts, [traces[0], [[5], []], traces[2]], rewards, SLOTS)),
        (ValueError, "prompt of problem 2 holds token id 200", (prompts[:2] + [[200]], traces, rewards, SLOTS)),
        (ValueError, "rewards of problem 0 must be finite", (prompts, traces, [[1, float("nan"), 0]] + rewards[1:],
                                                              SLOTS)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            trainer.step(*args)
    with pytest.raises(ValueError, match="objective must be one of sft, reinforce"):
        MemoryTrainer(model, bank, objective="grpo")
    assert not calls
