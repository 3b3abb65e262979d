"""Generators (local HF model, OpenAI-compatible endpoint) behind one on-disk call cache.

Every request is a chat (``[{"role", "content"}, ...]``). Its cache key is
``sha256(json({"messages", "generator": <id>, "params": <output-affecting parameters>}))``; a cached
reply is never asked for again, so an interrupted build resumes where it stopped and a rebuild costs
nothing. Entries are written atomically (temp file + ``os.replace``) as soon as each reply arrives; a
process killed mid-write leaves a temp file that is ignored. Failed calls are not cached.

Identical requests within one run are sent once.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dft import DftError

log = logging.getLogger(__name__)

Messages = list  # [{"role": ..., "content": ...}, ...]


@dataclass
class Completion:
    text: str = ""
    finish_reason: Optional[str] = None  #: ``stop`` | ``length`` | ...
    error: Optional[str] = None  #: set when the call failed after its retries
    cached: bool = False
    key: str = ""


class CallCache:
    """``<root>/<key[:2]>/<key>.json``; one file per reply."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    @staticmethod
    def key(messages: Messages, generator_id: str, params: dict) -> str:
        blob = json.dumps({"messages": messages, "generator": generator_id, "params": params},
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Optional[dict]:
        try:
            with open(self._path(key), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):  # cannot happen with atomic writes; be safe
            log.warning("ignoring a corrupt cache entry %s", self._path(key))
            return None

    def put(self, key: str, entry: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(entry, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class Generator:
    """Base class: caching, de-duplication, statistics. Subclasses implement :meth:`_complete`."""

    kind = "?"

    def __init__(self, cfg: Any, cache: CallCache):
        self.cfg = cfg
        self.cache = cache
        self.stats = {"requests": 0, "calls": 0, "cache_hits": 0, "errors": 0, "retries": 0,
                      "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0}
        self._lock = threading.Lock()

    id: str = "?"

    def params(self) -> dict:
        """Parameters that change the reply (part of the cache key)."""
        raise NotImplementedError

    def _complete(self, todo: list[tuple[str, Messages]], done: Callable[[str, Completion], None], progress) -> None:
        """Answer every (key, messages) of ``todo``, calling ``done(key, completion)`` as each arrives."""
        raise NotImplementedError

    def run(self, requests: list[Messages], desc: str = "generate", progress: bool = True, bar=None) -> list[Completion]:
        """Replies to ``requests``, in order; cached ones without a call. ``bar``: a tqdm bar to advance
        (one step per request) instead of a bar of its own."""
        from tqdm.auto import tqdm

        params = self.params()
        keys = [CallCache.key(m, self.id, params) for m in requests]
        results: dict[str, Completion] = {}
        todo: dict[str, Messages] = {}
        for k, m in zip(keys, requests):
            if k in results or k in todo:
                continue
            hit = self.cache.get(k)
            if hit is not None:
                results[k] = Completion(hit["text"], hit.get("finish_reason"), cached=True, key=k)
            else:
                todo[k] = m
        self.stats["requests"] += len(requests)
        self.stats["cache_hits"] += len(results)
        own_bar = bar is None
        if own_bar:
            bar = tqdm(total=len(requests), desc=desc, unit="call", disable=not progress)
        bar.update(len(requests) - len(todo))  # cache hits and repeated requests
        t0 = time.time()

        def done(key: str, c: Completion) -> None:
            c.key = key
            if not c.error:  # cache first: a reply counted as received is a reply on disk
                self.cache.put(key, {"generator": self.id, "params": params, "messages": todo[key],
                                     "text": c.text, "finish_reason": c.finish_reason, "created": time.time()})
            with self._lock:
                results[key] = c
                self.stats["calls"] += 1
                if c.error:
                    self.stats["errors"] += 1
                bar.update(1)

        try:
            if todo:
                self._complete(list(todo.items()), done, progress)
        finally:
            if own_bar:
                bar.close()
            self.stats["seconds"] += time.time() - t0
        # Identical requests share one reply (only the first copy was looked up or sent).
        return [results[k] for k in keys]

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- local model
class LocalGenerator(Generator):
    """A Hugging Face causal LM in this process: chat template, greedy decoding, left-padded batches.

    The model is loaded on the first uncached request, so a fully cached rebuild never loads it.
    """

    kind = "local"

    def __init__(self, cfg: Any, cache: CallCache, cache_dir: str):
        super().__init__(cfg, cache)
        from dft.databuild.models import load_model_option

        self.model_cfg = load_model_option(cfg.model)
        if self.model_cfg is None:
            raise DftError(f"generator.model={cfg.model!r} is not a conf/model option (conf/model/{cfg.model}.yaml)")
        if cfg.path:
            self.path = Path(cfg.path).expanduser()
            if not (self.path / "config.json").exists():
                raise DftError(f"generator.path={cfg.path}: no model there (expected a HF folder with config.json)")
        else:
            from dft.modeling import resolve_model_path

            self.path = resolve_model_path(self.model_cfg, cache_dir)
        # The folder name pins the weights: the embedded model's carries the GGUF's hash, a hub snapshot its commit.
        self.id = f"local:{self.model_cfg.name}:{self.path.name}"
        self._model = None
        self._tok = None

    def params(self) -> dict:
        return {"max_new_tokens": self.cfg.max_new_tokens, "decoding": "greedy"}

    def _load(self):
        if self._model is None:
            from dft.modeling import load_model, load_tokenizer, resolve_device

            self.device = resolve_device(self.cfg.device)
            t0 = time.time()
            self._tok = load_tokenizer(self.path, self.model_cfg)
            self._model = load_model(self.path, self.model_cfg, device=self.device)
            self._model.eval()
            log.info("generator %s loaded on %s in %.1f s", self.id, self.device, time.time() - t0)
        return self._model, self._tok

    def _complete(self, todo, done, progress) -> None:
        import torch
        from transformers import GenerationConfig

        from dft.families import apply_system_policy
        from dft.modeling import generation_eos_ids

        model, tok = self._load()
        eos = generation_eos_ids(tok, self.model_cfg)
        gen_cfg = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=False, eos_token_id=eos,
                                   pad_token_id=tok.pad_token_id)
        texts = {k: tok.apply_chat_template(apply_system_policy(m, self.model_cfg), tokenize=False,
                                            add_generation_prompt=True) for k, m in todo}
        lengths = {k: len(tok(t, add_special_tokens=False)["input_ids"]) for k, t in texts.items()}
        # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once.
        order = sorted(texts, key=lambda k: -lengths[k])
        tok.padding_side = "left"
        try:
            for i in range(0, len(order), self.cfg.batch_size):
                batch = order[i : i + self.cfg.batch_size]
                enc = tok([texts[k] for k in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                with torch.no_grad():
                    out = model.generate(**enc, generation_config=gen_cfg)
                new = out[:, enc["input_ids"].shape[1]:]
                for k, row in zip(batch, new.tolist()):
                    stopped = any(t in eos for t in row)
                    if stopped:
                        row = row[: min(row.index(t) for t in eos if t in row)]
                    self.stats["prompt_tokens"] += lengths[k]
                    self.stats["completion_tokens"] += len(row)
                    done(k, Completion(tok.decode(row, skip_special_tokens=True), "stop" if stopped else "length"))
        finally:
            tok.padding_side = "right"


# --------------------------------------------------------------------------------------------- endpoint
class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: Optional[float] = None):
        super().__init__(msg)
        self.retry_after = retry_after


class _Fatal(Exception):
    """An error every later request would hit too (bad key, unknown model): stop the build."""


RETRY_STATUS = {408, 409, 425, 429}
FATAL_STATUS = {401, 403, 404}


class OpenAIGenerator(Generator):
    """``POST {base_url}/chat/completions`` from a thread pool, with retries and exponential backoff."""

    kind = "openai"

    def __init__(self, cfg: Any, cache: CallCache):
        super().__init__(cfg, cache)
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        parsed = urllib.parse.urlparse(cfg.base_url)
        self.id = f"openai:{cfg.model}@{parsed.netloc}{parsed.path.rstrip('/')}"
        self._key: Optional[str] = None

    def params(self) -> dict:
        return {"max_tokens": self.cfg.max_new_tokens, "temperature": self.cfg.temperature,
                "json_mode": self.cfg.json_mode, "extra": dict(self.cfg.extra)}

    def _api_key(self) -> Optional[str]:
        env = self.cfg.api_key_env
        if not env:
            return None
        key = os.environ.get(env)
        if not key:
            raise DftError(
                f"generator.api_key_env={env} but ${env} is not set: export it (the key never goes into a config), "
                "or set generator.api_key_env=null for an endpoint without authentication"
            )
        return key

    def _body(self, messages: Messages) -> dict:
        body = {"model": self.cfg.model, "messages": messages, self.cfg.max_tokens_field: self.cfg.max_new_tokens}
        if self.cfg.temperature is not None:  # some reasoning models reject the parameter
            body["temperature"] = self.cfg.temperature
        if self.cfg.json_mode:
            body["response_format"] = {"type": "json_object"}
        body.update(dict(self.cfg.extra))
        return body

    def _post_once(self, body: bytes) -> Completion:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace") if e.fp else ""
            msg = f"HTTP {e.code} from {self.url}: {detail}".strip()
            if e.code in RETRY_STATUS or e.code >= 500:
                ra = e.headers.get("Retry-After") if e.headers else None
                try:
                    ra_s = float(ra) if ra is not None else None
                except ValueError:
                    ra_s = None
                raise _Retryable(msg, ra_s) from None
            if e.code in FATAL_STATUS:
                raise _Fatal(msg) from None
            return Completion(error=msg)
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        try:
            payload = json.loads(raw)
            choice = payload["choices"][0]
            text = choice["message"]["content"]
            usage = payload.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError):
            return Completion(error=f"not a chat-completions response: {raw[:200]!r}")
        if not isinstance(text, str):
            return Completion(error=f"no text content in the response (finish_reason={choice.get('finish_reason')})")
        with self._lock:
            self.stats["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            self.stats["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        return Completion(text, choice.get("finish_reason"))

    def _post(self, messages: Messages, stop: threading.Event) -> Completion:
        body = json.dumps(self._body(messages)).encode("utf-8")
        attempt = 0
        while True:
            try:
                return self._post_once(body)
            except _Retryable as e:
                if attempt >= self.cfg.max_retries or stop.is_set():
                    return Completion(error=f"{e} (gave up after {attempt + 1} attempts)")
                wait = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2**attempt) * random.uniform(0.8, 1.2)
                if e.retry_after is not None:
                    wait = min(self.cfg.backoff_max_s, max(wait, e.retry_after))
                log.debug("retry %d in %.2f s: %s", attempt + 1, wait, e)
                with self._lock:
                    self.stats["retries"] += 1
                attempt += 1
                stop.wait(wait)

    def _complete(self, todo, done, progress) -> None:
        self._key = self._api_key()
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.cfg.max_workers, thread_name_prefix="dft-gen")
        try:
            futures = {pool.submit(self._post, m, stop): k for k, m in todo}
            for fut in as_completed(futures):
                try:
                    c = fut.result()
                except _Fatal as e:
                    raise DftError(f"generator {self.id}: {e} (check generator.base_url, generator.model and ${self.cfg.api_key_env})") from None
                done(futures[fut], c)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


def make_generator(cfg: Any, cache_dir: str, call_cache: str) -> Generator:
    cache = CallCache(call_cache)
    if cfg.kind == "local":
        return LocalGenerator(cfg, cache, cache_dir)
    if cfg.kind == "openai":
        return OpenAIGenerator(cfg, cache)
    raise DftError(f"generator.kind={cfg.kind!r} is not one of local, openai")
