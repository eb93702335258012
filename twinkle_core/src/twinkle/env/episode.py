"""Multi-turn rollouts, token in and token out: :func:`run_episodes` and the :class:`Episode` it returns.

Each episode is one token sequence that only grows:

    [opening prompt] [model turn 1] [environment's answer 1] [model turn 2] ... [model turn n]

* The opening is the environment's ``reset(task)`` Trajectory, encoded by the template with the
  generation prompt.
* A model turn is exactly the tokens the sampler drew (never decoded and re-encoded), with the
  sampler's log-probabilities; these are the only tokens with labels (the loss mask).
* The environment's answer is rendered by the chat template as text and tokenized once: what the
  template writes after the model's turn (for ChatML ``\\n`` after ``<|im_end|>``), the new
  messages (tool results, a user's follow-up) and the next generation prompt. No labels.

So the training row (:meth:`Episode.row`) is the sequence the model actually saw and produced, the
per-token log-probabilities are the sampler's own, and the loss covers the model's tokens only.

Every call of :func:`run_episodes` runs the active episodes' next turns in one ``sampler.sample``
call (a batch), steps each environment, and repeats until all are done or hit ``max_turns``.

Example::

    episodes = run_episodes(sampler, template, make_env, tasks, SamplingParams(max_tokens=64), group_size=8)
    rewards = [e.total_reward for e in episodes]                 # per-turn + final rewards
    advantages = GRPOAdvantage()(rewards, num_generations=8)     # groups are contiguous
    model.forward_backward(inputs=[e.row(advantages=a) for e, a in zip(episodes, advantages)])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from twinkle.data_format.features import IGNORE_INDEX
from twinkle.env.base import Environment
from twinkle.template.base import TemplateError

_SENTINEL = "\x00TWINKLE-TURN\x00"


@dataclass
class Episode:
    """One multi-turn episode as tokens, with the loss mask on the model's tokens.

    Attributes:
        task: the task the environment was reset with.
        group: the index of the task in the batch (the ``group_size`` episodes of a task share it).
        tokens: the whole sequence (prompt, model turns, environment answers).
        mask: 1 where the model sampled the token (trained), 0 elsewhere.
        logprobs: the sampler's log-probability of each model token, 0.0 elsewhere.
        turn_spans: ``[start, end)`` of each model turn in ``tokens``.
        turn_rewards: each turn's reward from the environment.
        final_reward: the outcome's reward (0 when the episode was cut at ``max_turns``).
        messages: the conversation as text (the model's turns as assistant messages).
        done: the environment ended the episode (False: cut by ``max_turns`` or ``max_length``).
        info: each step's ``info``.
    """

    task: Mapping[str, Any]
    group: int
    tokens: list[int]
    mask: list[int]
    logprobs: list[float]
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    final_reward: float = 0.0
    messages: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    info: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None

    @property
    def total_reward(self) -> float:
        """The per-turn rewards plus the final reward."""
        return float(sum(self.turn_rewards) + self.final_reward)

    @property
    def num_turns(self) -> int:
        return len(self.turn_spans)

    @property
    def trajectory(self) -> dict[str, Any]:
        """The conversation as a Trajectory (what text rewards take)."""
        out: dict[str, Any] = {"messages": list(self.messages), "user_data": dict(self.task)}
        if self.tools:
            out["tools"] = self.tools
        return out

    def row(self, **fields: Any) -> dict[str, Any]:
        """The training row: ``input_ids``, ``labels`` (-100 off the model's tokens), ``old_logps``, ``fields``."""
        labels = [t if m else IGNORE_INDEX for t, m in zip(self.tokens, self.mask)]
        return {
            "input_ids": list(self.tokens),
            "labels": labels,
            "attention_mask": [1] * len(self.tokens),
            "old_logps": list(self.logprobs),
            **fields,
        }

    def token_rewards(self) -> list[float]:
        """Per-token rewards: each turn's reward on its last token, the final reward on the last model token.

        Feeds per-token estimators (:func:`twinkle.advantage.gae`) with the model's tokens only:
        ``[r for r, m in zip(episode.token_rewards(), episode.mask) if m]``.
        """
        rewards = [0.0] * len(self.tokens)
        for (_, end), reward in zip(self.turn_spans, self.turn_rewards):
            rewards[end - 1] += reward
        if self.turn_spans:
            rewards[self.turn_spans[-1][1] - 1] += self.final_reward
        return rewards


class ChatRenderer:
    """Renders conversations with a Template's chat format and tokenizes the environment's answers.

    Args:
        template: a :class:`~twinkle.template.base.Template` (its tokenizer, chat template and
            default system prompt).
    """

    def __init__(self, template: Any) -> None:
        self.template = template
        self.tokenizer = template.tokenizer

    def render(self, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
        prepared, tools = self.template._prepare({"messages": messages, "tools": tools}, 0, "messages")
        return self.tokenizer.apply_chat_template(
            prepared, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def prompt_tokens(self, opening: Mapping[str, Any]) -> list[int]:
        """The opening Trajectory encoded with the generation prompt."""
        return list(self.template.encode(dict(opening), add_generation_prompt=True)["input_ids"])

    def answer_tokens(
        self, messages: list[dict[str, Any]], new: list[dict[str, Any]], tools: Any, turn_tokens: list[int]
    ) -> list[int]:
        """The tokens that follow the model's last turn: the template's end of that turn, ``new``, the next prompt.

        Args:
            messages: the conversation so far, ending with the model's turn (an assistant message).
            new: the environment's messages.
            tools: the Trajectory's tools.
            turn_tokens: the tokens the model sampled for its last turn.

        Raises:
            TemplateError: the chat template renders earlier turns differently once more follow
                (e.g. it drops reasoning from past turns), so the episode cannot grow by appending.
        """
        before = self.render(messages, tools, add_generation_prompt=False)
        after = self.render(messages + new, tools, add_generation_prompt=True)
        if not after.startswith(before):
            raise TemplateError(
                "the chat template renders the conversation's earlier turns differently once more messages "
                "follow, so a multi-turn episode cannot be built by appending tokens; use a template that "
                "keeps past turns as they were"
            )
        # what the template writes after an assistant turn's content, minus what the model already wrote
        probe = self.render(messages[:-1] + [{"role": "assistant", "content": _SENTINEL}], tools, False)
        closing = probe[probe.rindex(_SENTINEL) + len(_SENTINEL) :]
        written = self.tokenizer.decode(turn_tokens[-1:], skip_special_tokens=False) if turn_tokens else ""
        if written and closing.startswith(written) and turn_tokens[-1] in set(self.tokenizer.all_special_ids):
            closing = closing[len(written) :]
        return list(self.tokenizer.encode(closing + after[len(before) :], add_special_tokens=False))

    def turn_text(self, turn_tokens: list[int]) -> str:
        """The assistant message's content of a turn: its tokens without the closing special token."""
        ids = list(turn_tokens)
        if ids and ids[-1] in set(self.tokenizer.all_special_ids):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def run_episodes(
    sampler: Any,
    template: Any,
    make_env: Callable[[], Environment],
    tasks: Sequence[Mapping[str, Any]],
    sampling_params: Any,
    *,
    group_size: int = 1,
    max_turns: int | None = None,
    max_length: int | None = None,
    adapter_name: str | None = None,
) -> list[Episode]:
    """Run ``group_size`` episodes per task to the end, all turns batched; token in, token out.

    Args:
        sampler: any :class:`~twinkle.sampler.base.Sampler` (a proxy in ray mode too).
        template: the chat format (a :class:`~twinkle.template.base.Template`), the sampler's own.
        make_env: builds one fresh environment (called once per episode).
        tasks: one dict per task (given to ``env.reset``).
        sampling_params: as for ``Sampler.sample`` (per model turn; ``num_samples`` is ignored).
            With a ``seed``, turn ``k`` samples with ``seed + k``.
        group_size: episodes per task (contiguous in the result: GRPO groups).
        max_turns: most model turns (default: the environment's ``max_turns``).
        max_length: most tokens per episode; an episode that would exceed it stops (not done).
        adapter_name: the adapter to sample with.

    Returns:
        The episodes, task by task, ``group_size`` each.
    """
    from twinkle.data_format.sampling import as_sampling_params

    params = as_sampling_params(sampling_params).model_copy(update={"num_samples": 1, "logprobs": True})
    renderer = ChatRenderer(template)
    episodes: list[Episode] = []
    envs: list[Environment] = []
    for group, task in enumerate(tasks):
        for _ in range(group_size):
            env = make_env()
            opening = env.reset(task)
            tokens = renderer.prompt_tokens(opening)
            episodes.append(
                Episode(
                    task=task,
                    group=group,
                    tokens=tokens,
                    mask=[0] * len(tokens),
                    logprobs=[0.0] * len(tokens),
                    messages=list(opening["messages"]),
                    tools=opening.get("tools"),
                )
            )
            envs.append(env)
    limits = [max_turns if max_turns is not None else env.max_turns for env in envs]
    active = list(range(len(episodes)))
    turn = 0
    while active:
        update = {} if params.seed is None else {"seed": params.seed + turn}
        responses = sampler.sample(
            [{"input_ids": episodes[i].tokens} for i in active],
            params.model_copy(update=update),
            adapter_name=adapter_name,
        )
        still = []
        for i, response in zip(active, responses):
            episode, env = episodes[i], envs[i]
            seq = response.sequences[0]
            start = len(episode.tokens)
            episode.tokens += seq.tokens
            episode.mask += [1] * len(seq.tokens)
            episode.logprobs += list(seq.logprobs) if seq.logprobs is not None else [0.0] * len(seq.tokens)
            episode.turn_spans.append((start, len(episode.tokens)))
            text = renderer.turn_text(seq.tokens)
            episode.messages.append({"role": "assistant", "content": text})
            result = env.step(text)
            episode.turn_rewards.append(float(result.reward))
            episode.info.append(dict(result.info))
            if result.done:
                episode.done = True
                episode.final_reward = float(result.final_reward)
                continue
            if episode.num_turns >= limits[i]:
                continue
            answer = renderer.answer_tokens(episode.messages, list(result.messages), episode.tools, seq.tokens)
            if max_length is not None and len(episode.tokens) + len(answer) + 1 > max_length:
                continue
            episode.messages += list(result.messages)
            episode.tokens += answer
            episode.mask += [0] * len(answer)
            episode.logprobs += [0.0] * len(answer)
            still.append(i)
        active = still
        turn += 1
    return episodes
