"""The batched episode loop shared by evaluation, data collection and CMAT rollouts.

Up to `concurrency` episodes are active at once; each turn, one `policy.generate` call serves every
active conversation, then each episode steps its environment. Finished episodes are replaced from the
queue, so the batch stays full until the queue runs dry.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Protocol

from cmat_pipeline.runtime.policy import Policy


class Episode(Protocol):
    messages: list[dict[str, str]]
    done: bool

    def step(self, response: str | None) -> None: ...

    def result(self) -> dict[str, Any]: ...


def run_episodes(
    start_episodes: Iterable[Callable[[], Episode]],
    policy: Policy,
    concurrency: int,
    close: Callable[[Episode], None] = lambda episode: None,
    on_result: Callable[[dict[str, Any]], None] = lambda result: None,
) -> list[dict[str, Any]]:
    """Play every episode to its end; results come back in the order the episodes were given.

    `start_episodes` yields zero-argument callables so that each episode's environment (a database,
    a sandbox) is created only when a batch slot frees up, and `close` releases it right after.
    """
    queue = deque(enumerate(start_episodes))
    active: list[tuple[int, Episode]] = []
    results: dict[int, dict[str, Any]] = {}
    try:
        while queue or active:
            while queue and len(active) < concurrency:
                order, start = queue.popleft()
                active.append((order, start()))
            outputs = policy.generate([episode.messages for _, episode in active])
            still_active = []
            for (order, episode), output in zip(active, outputs):
                episode.step(output.text)
                if episode.done:
                    results[order] = episode.result()
                    close(episode)
                    on_result(results[order])
                else:
                    still_active.append((order, episode))
            active = still_active
    finally:  # an error (or Ctrl-C) must not leave databases or sandboxes behind
        for _, episode in active:
            close(episode)
    return [results[k] for k in sorted(results)]
