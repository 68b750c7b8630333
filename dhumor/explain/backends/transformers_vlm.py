"""A local vision-language model through transformers (Qwen2-VL / Qwen2.5-VL, SmolVLM, LLaVA, Idefics):
``AutoModelForImageTextToText`` + ``AutoProcessor`` from a hub id or a local directory; batched
generation with left padding; bf16 on a GPU."""
from __future__ import annotations

import time

import torch

from dhumor.errors import WeightsNotFoundError
from dhumor.explain.backends.base import Backend, Generation, GenerationRequest, chat_messages


class TransformersVLMBackend(Backend):
    name = "transformers"
    supports_images = True

    def __init__(self, model: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 4, trust_remote_code: bool = False, system_role: bool = True):
        """
        Args:
            model: hub id (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``) or a local directory.
            device, dtype: ``auto`` = CUDA with bf16 when available, else CPU float32.
            batch_size: requests generated together.
            system_role: False merges the system prompt into the user turn (templates without a system role).
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_id, self.revision, self.batch_size, self.system_role = model, revision, max(1, batch_size), system_role
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        torch_dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                       "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        try:
            self.processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        except OSError as e:
            raise WeightsNotFoundError(
                f"vision-language model {model!r} is not available here ({str(e).splitlines()[0][:200]}). Download it "
                f"on a connected machine (`hf download {model} --local-dir DIR`) and pass --model DIR.") from None
        tok = getattr(self.processor, "tokenizer", self.processor)
        tok.padding_side = "left"  # generation appends on the right: pad on the left
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok

    def fingerprint(self) -> dict:
        return {"backend": self.name, "model": self.model_id, "revision": self.revision,
                "commit": getattr(self.model.config, "_commit_hash", None)}

    def _conversation(self, req: GenerationRequest) -> list[dict]:
        msgs = chat_messages(req, with_image=True)
        for m in msgs:  # processors want content as typed parts
            if isinstance(m["content"], str):
                m["content"] = [{"type": "text", "text": m["content"]}]
        if not self.system_role:
            sys_text = msgs[0]["content"][0]["text"]
            msgs = msgs[1:]
            msgs[0]["content"][-1]["text"] = sys_text + "\n\n" + msgs[0]["content"][-1]["text"]
        return msgs

    @torch.inference_mode()
    def _batch(self, reqs: list[GenerationRequest]) -> list[Generation]:
        t0 = time.perf_counter()
        texts = [self.processor.apply_chat_template(self._conversation(r), add_generation_prompt=True, tokenize=False)
                 for r in reqs]
        images = [[r.image.convert("RGB")] if r.image is not None else None for r in reqs]
        if any(i is None for i in images):
            raise ValueError("the transformers VLM backend needs the meme image for every request")
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)
        sample = max(r.temperature for r in reqs) > 0
        out = self.model.generate(**inputs, max_new_tokens=max(r.max_tokens for r in reqs), do_sample=sample,
                                  temperature=max(r.temperature for r in reqs) if sample else None,
                                  pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        dt = (time.perf_counter() - t0) / len(reqs)
        gens = []
        for i, row in enumerate(new):
            n = int((row != self.tokenizer.pad_token_id).sum())
            gens.append(Generation(self.tokenizer.decode(row, skip_special_tokens=True),
                                   int(inputs["attention_mask"][i].sum()), n, dt))
        return gens

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        out = []
        for b in range(0, len(requests), self.batch_size):
            chunk = requests[b:b + self.batch_size]
            try:
                out.extend(self._batch(chunk))
            except (RuntimeError, ValueError) as e:  # e.g. out of memory on a huge image: report, go on
                out.extend(Generation("", error=f"{type(e).__name__}: {str(e)[:300]}") for _ in chunk)
        return out
