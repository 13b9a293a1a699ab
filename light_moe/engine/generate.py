"""The offline convenience loops of LightMoEEngine: generate / generate_outputs / stream / chat.

Each is a loop over the engine's public request API (validate, add_request, step, abort) and its
tokenizer; nothing here touches the scheduler, the runner or tensors. LightMoEEngine inherits them.
"""
from __future__ import annotations

from collections.abc import Iterator

from light_moe.engine.outputs import RequestOutput
from light_moe.sampling_params import SamplingParams

Prompt = str | list[int]


def _is_single_prompt(prompts) -> bool:
    """One prompt (text or token ids) rather than a list of prompts."""
    return isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))


class GenerateLoops:
    """Mixed into LightMoEEngine, whose validate / add_request / step / abort / tokenizer it uses."""

    def _params(self, sampling_params: SamplingParams | None, kwargs: dict) -> SamplingParams:
        if sampling_params is not None and kwargs:
            raise TypeError("pass either sampling_params or keyword sampling arguments, not both")
        return sampling_params or SamplingParams(**kwargs)

    def generate_outputs(
        self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | None = None, **kwargs
    ) -> list[RequestOutput]:
        """Final RequestOutput (token ids, text, finish reason, logprobs) of each prompt, in order."""
        params = self._params(sampling_params, kwargs)
        batch = [prompts] if _is_single_prompt(prompts) else list(prompts)
        if not batch:
            raise ValueError("no prompts given")
        for p in batch:  # validate everything before queuing anything
            self.validate(p, params)
        ids = [self.add_request(p, params) for p in batch]
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for output in self.step():
                    if output.finished and output.request_id in ids:
                        done[output.request_id] = output
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
        failed = [done[rid] for rid in ids if done[rid].finish_reason == "error"]
        if failed:  # the others finished; this one's own work raised (logged with its traceback)
            raise RuntimeError(f"request {failed[0].request_id!r} failed: {failed[0].error}")
        return [done[rid] for rid in ids]

    def generate(
        self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | None = None, **kwargs
    ) -> str | list[str]:
        """Generated text: a string for one prompt, a list for a list of prompts."""
        single = _is_single_prompt(prompts)
        texts = [o.text for o in self.generate_outputs(prompts, sampling_params, **kwargs)]
        return texts[0] if single else texts

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, **kwargs) -> Iterator[str]:
        """Yield text increments of one prompt as they are generated."""
        params = self._params(sampling_params, kwargs)
        rid = self.add_request(prompt, params)
        finished = False
        try:
            while not finished:
                for output in self.step():
                    if output.request_id == rid:
                        if output.finish_reason == "error":
                            raise RuntimeError(f"request {rid!r} failed: {output.error}")
                        if output.delta_text:
                            yield output.delta_text
                        finished = output.finished
        finally:
            if not finished:
                self.abort(rid)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # the template already carries any BOS it wants
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None, **kwargs) -> str:
        return self.generate(self.apply_chat_template(messages), sampling_params, **kwargs)
