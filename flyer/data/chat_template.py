"""Chat templates: a conversation rendered to text as transformers' ``apply_chat_template`` renders it.

The server renders prompts with it (``flyer.serve.api``), and ``flyer train`` renders chat data with it
(``flyer.data.chat_data``); ``read_chat_template`` finds a checkpoint's, or the ``ChatEncoding`` of a release that
ships Python code instead (DeepSeek-V3.2 / V4: ``flyer.data.deepseek_encoding``), which renders through the same call.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from flyer.data import tools_typescript
from flyer.data.deepseek_encoding import ENCODINGS, ChatEncoding, ChatTemplate, joined_parts
from flyer.data.tiktoken_file import sorts_tools
from flyer.config import ModelConfig
from flyer.errors import ConfigError, FieldError
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import is_hf_model_dir
from flyer.interop.load import settings_dir
from flyer.train.checkpoint import NAMED_TEMPLATES

# The template when the checkpoint has none: the BOS (a chat prompt is encoded without special tokens, as
# transformers encodes it), the tools as JSON when given, one header line per message, then the assistant's; an
# assistant's turn ends with the EOS, which chat data trains, so a fine-tuned model learns to stop there. An
# assistant's reasoning_content is written before its content as DeepSeek-R1 writes it, after the last user turn only
# (R1's and Qwen3's rule, which chat data's pieces follow: flyer.data.chat_data), its tool calls after its content in
# DeepSeek-V3.1's format, the one ``flyer serve`` reads from a model without a template (flyer.serve.tools).
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(last=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% if tools %}<|tools|>\n{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' and loop.index0 > ns.last and m['reasoning_content'] %}"
    "<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}{{ m['content'] }}"
    "{% if m['tool_calls'] %}<｜tool▁calls▁begin｜>{% for c in m['tool_calls'] %}<｜tool▁call▁begin｜>"
    "{{ c['function']['name'] }}<｜tool▁sep｜>{{ c['function']['arguments'] if c['function']['arguments'] is string "
    "else c['function']['arguments'] | tojson }}<｜tool▁call▁end｜>{% endfor %}<｜tool▁calls▁end｜>{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class ToolsSorted(str):
    """A chat template whose tokenizer sorts the keys of the tools, at every depth, before the template renders them
    (``flyer.data.tiktoken_file.sorts_tools``: Kimi's remote ``apply_chat_template``); ``chat_renderer`` sorts them
    too. Otherwise the template text it is."""


def sorts_tools_of(template: ChatTemplate) -> bool:
    """Whether ``template`` (or a named one of it) is ``ToolsSorted``: the tools it sees differ from those given."""
    return any(isinstance(t, ToolsSorted) for t in (template.values() if isinstance(template, dict) else [template]))


def renders_developer(template: ChatTemplate) -> bool:
    """Whether ``template`` writes a ``developer`` message: flyer's default (any role as its header) and a release's
    encoder (DeepSeek-V3.2 / V4's own role) do; a Hugging Face template does where its text names the role. One that
    does not would drop it without a word (DeepSeek-R1's, Qwen's: no branch for it), so the server passes it as
    ``system``, the instructions OpenAI's API means by it, as vLLM and llama.cpp's servers map it."""
    if template is None or isinstance(template, ChatEncoding):
        return True
    return any("developer" in t for t in (template.values() if isinstance(template, dict) else [template]))


# the names a message's reasoning comes under, the one chat templates read first (transformers' _REASONING_FIELDS)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def template_message(message: dict) -> dict:
    """A chat message (JSON data) as transformers 5's ``apply_chat_template`` hands it to a template: its keys set
    to None left out (``_normalize_chat_messages``: ``{{ content }}`` would render "None", a loop over content
    fail), and a reasoning sent under any of ``REASONING_FIELDS`` under ``reasoning_content`` and ``thinking``
    too, the first given winning (``_alias_reasoning_fields``: vLLM's clients send ``reasoning``, gpt-oss's
    templates read ``thinking``)."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


_GENERATION_TAG = re.compile(r"({%-?\s*)(end)?generation(\s*-?%})")


def chat_renderer(template: ChatTemplate, special: dict[str, str] | None = None):
    """messages -> prompt text with ``template`` (a Hugging Face chat template; None: the default; named templates:
    "tool_use" for a call given tools when there is one, else "default", as transformers' ``get_chat_template``),
    in a sandboxed Jinja environment set up as transformers sets up its own; a ``ChatEncoding`` (a release's
    Python encoder: ``flyer.data.deepseek_encoding``) renders with its own code, the same call. ``special``:
    the named special tokens the template sees (``bos_token``, ``eos_token``, ...; ``TextTokenizer.special_tokens``).
    A message's content may be OpenAI's list of text parts: a template that reads parts (``content_format``
    "openai") sees the list, as transformers' ``apply_chat_template`` passes it; another sees their text joined
    with "\n", as vLLM's server renders it (a list would render as its Python text). A template that reads
    ``tools_ts_str`` (Kimi K2.5 and later) gets the variables Kimi's tokenizer wrapper passes
    (``flyer.data.tools_typescript.chat_kwargs``: the tools as TypeScript, its thinking defaults). transformers'
    ``{% generation %}`` blocks render their body, as its ``apply_chat_template`` renders them. Every message is
    passed as transformers 5 passes it (``template_message``), to a template and to an encoding alike."""
    if isinstance(template, dict):
        by_name = {n: chat_renderer(template[n], special) for n in ("default", "tool_use") if n in template}

        def named_render(messages: list[dict], tools: list[dict] | None = None, *args, **kwargs) -> str:
            return by_name["tool_use" if tools is not None and "tool_use" in by_name else "default"](
                messages, tools, *args, **kwargs)
        return named_render
    if isinstance(template, ChatEncoding):
        def encoded(messages: list[dict], *args, **kwargs) -> str:
            return template.render([template_message(m) for m in messages], *args, **kwargs)
        return encoded
    # transformers' {% generation %} markers (the assistant mask's) render their body: an always-true block,
    # whitespace control kept
    sort_tools = isinstance(template, ToolsSorted)  # (a K2.5 template's wrapper sorts them too: chat_kwargs)
    template = _GENERATION_TAG.sub(lambda m: m[1] + ("endif" if m[2] else "if true") + m[3], template or "") or None
    import jinja2.meta
    import jinja2.sandbox  # here: 40 ms every flyer command would pay at start (train and serve CLIs import us)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: Jinja's own escapes <>&' and sorts keys, so a template would render other text
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: time.strftime(f))
    compiled = env.from_string(template or DEFAULT_CHAT_TEMPLATE)
    parts = content_format(template) == "openai"
    kimi = "tools_ts_str" in jinja2.meta.find_undeclared_variables(env.parse(template or DEFAULT_CHAT_TEMPLATE))

    named = {"bos_token": "", "eos_token": "", **(special or {})}
    taken = {"messages", "tools", "add_generation_prompt", *named, *env.globals}

    def render(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               extra: dict | None = None, response_format: dict | None = None) -> str:
        """``tools``: OpenAI's tool definitions, as transformers' ``apply_chat_template(tools=...)`` passes them;
        ``response_format``: ignored, a template has no place for it (``ChatEncoding.render`` writes it);
        ``add_generation_prompt``: end with the assistant's header (a prompt) or not (a whole conversation);
        ``extra``: more variables the template sees (a request's ``chat_template_kwargs``, as transformers'
        ``apply_chat_template(**kwargs)`` passes them, e.g. V3.1's ``thinking``). ``FieldError`` naming
        chat_template_kwargs for one that would shadow the messages, the tools, a special token or a function;
        ``jinja2.TemplateError`` for any error the template raises while it renders (its ``raise_exception``, a
        ``TypeError`` of its own arithmetic on a message's value, ...)."""
        shadowed = sorted(taken & set(extra or ()))
        if shadowed:
            raise FieldError("chat_template_kwargs", f"{shadowed} are the template's own variables (messages, "
                                                     "tools, special tokens, functions); other names only")
        messages = [template_message(m) for m in messages]
        if kimi:
            tools, extra = tools_typescript.chat_kwargs(tools, extra)
        elif sort_tools:
            tools = tools_typescript.deep_sorted(tools)
        # transformers passes documents (None unless given) to every template: "documents is none" must hold
        variables = {"documents": None, **dict(tools=tools, add_generation_prompt=add_generation_prompt, **named,
                                               **(extra or {}))}
        try:
            return rendered(messages, variables)
        except jinja2.TemplateError:
            if all("content" in m for m in messages):
                raise
            # a template adding a null content to text beside its calls (DeepSeek-V3 / R1's, Qwen3's: transformers
            # 5 fails on them) gets no text, as vLLM passes it (no parts: "" to a template that reads strings)
            return rendered([m if "content" in m else {**m, "content": []} for m in messages], variables)

    def rendered(messages: list[dict], variables: dict) -> str:
        if not parts:
            messages = [joined_parts(m, "\n") for m in messages]
        try:
            return compiled.render(messages=messages, **variables)
        except (jinja2.TemplateError, MemoryError):
            raise
        except Exception as e:  # the template's own operations on these messages (None + str, ...) failed
            raise jinja2.TemplateError(f"{type(e).__name__}: {e}") from e
    return render


def effort_kwargs(encoding: ChatEncoding | None, effort: str | None, extra: dict | None) -> dict | None:
    """A request's chat_template_kwargs ``extra`` with OpenAI's top-level ``reasoning_effort`` ``effort`` (None: as
    it is) applied, as vLLM's server applies it: for a Jinja template (``encoding`` None) the variable
    ``reasoning_effort`` (gpt-oss's templates read it; others ignore it), and ``enable_thinking`` (Qwen3's and
    Gemma's switch) true unless the effort is "none", where ``extra`` does not set it; a release's encoder maps it its
    own way (``ChatEncoding.effort_kwargs``). ``FieldError`` naming reasoning_effort where ``extra`` holds another
    reasoning_effort (vLLM lets the top-level one win: flyer drops neither silently)."""
    if effort is None:
        return extra
    if encoding is not None:
        return encoding.effort_kwargs(effort, extra)
    extra = dict(extra or {})
    if extra.get("reasoning_effort", effort) != effort:
        raise FieldError("reasoning_effort", f"{effort!r} differs from chat_template_kwargs' reasoning_effort "
                                             f"{extra['reasoning_effort']!r}: send one of them")
    return {"enable_thinking": effort != "none", **extra, "reasoning_effort": effort}


def content_format(template: str | None) -> str:
    """How a Jinja chat ``template`` (None: the default) reads a message's content, as vLLM's
    ``--chat-template-content-format auto`` reads it: "openai" when it loops over a message's content (``for part
    in message['content']``, the message a loop's item over ``messages`` or a name set to them, through filters
    and slices), else "string"."""
    import jinja2
    from jinja2 import nodes

    ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template or DEFAULT_CHAT_TEMPLATE)

    def reads(node, names: set[str], key: str | None = None) -> bool:  # node is names[...] / name[key] / name.key
        while isinstance(node, (nodes.Filter, nodes.Test)) or \
                (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice)):
            node = node.node
        if key is not None:
            if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and node.arg.value == key or \
                    isinstance(node, nodes.Getattr) and node.attr == key:
                node = node.node
            else:
                return False
        return isinstance(node, nodes.Name) and node.name in names

    lists, more = set(), {"messages"}
    while more:  # names set to the messages (or a slice of them), and names set to those
        lists |= more
        more = {a.target.name for a in ast.find_all(nodes.Assign)
                if isinstance(a.target, nodes.Name) and reads(a.node, lists)} - lists
    items = {f.target.name for f in ast.find_all(nodes.For)
             if isinstance(f.target, nodes.Name) and reads(f.iter, lists)}
    return "openai" if any(reads(f.iter, items, "content") for f in ast.find_all(nodes.For)) else "string"


def read_chat_template(ckpt: str | Path | None) -> ChatTemplate:
    """The chat template of a Hugging Face directory, or of a flyer run fine-tuned from one (which carries its
    settings: ``flyer.interop.load.settings_dir``), found as transformers 5 finds it: ``chat_template.jinja`` (the
    "default") and ``additional_chat_templates/NAME.jinja`` (named ones), else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates); named templates as a dict (``chat_renderer`` picks
    one per call), which must hold a "default" (a one-line ``ConfigError``). Without one, the ``ChatEncoding`` of a
    directory whose config.json ``model_type`` has one (``ENCODINGS``: DeepSeek-V3.2 and V4 ship a Python encoder,
    no template), for a run the model_type its model exports as; None for flyer's own runs and directories with
    neither. A directory whose remote-code tokenizer sorts the tools' keys before rendering (Kimi's: ``sorts_tools``)
    gives ``ToolsSorted`` templates."""
    root = settings_dir(ckpt) if ckpt else None
    if root is None:
        return None
    template = _read_template(root)
    if sorts_tools(root):  # its tokenizer's apply_chat_template sorts the tools' keys first (Kimi's)
        return {k: ToolsSorted(t) for k, t in template.items()} if isinstance(template, dict) else \
            ToolsSorted(template) if isinstance(template, str) else template
    return template


def _text(path: Path) -> str:
    """A template file's text; ``ConfigError`` naming it where it is no UTF-8 (as one that does not compile)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: the chat template is not UTF-8 text (byte {e.start})") from None


def _read_template(root: Path) -> ChatTemplate:
    """``read_chat_template`` of the settings directory ``root``, as it is written."""
    files = [root / "chat_template.jinja", *sorted((root / NAMED_TEMPLATES).glob("*.jinja"))]
    named = {("default" if f.parent == root else f.stem): _compiles(_text(f), f) for f in files if f.is_file()}
    where = root / (NAMED_TEMPLATES if named.keys() - {"default"} else "chat_template.jinja")
    if not named:  # the files take priority over the config's entry, as transformers reads them
        t, where = _json_field(root / "tokenizer_config.json", "chat_template"), root / "tokenizer_config.json"
        if isinstance(t, list):
            named = {x["name"]: _compiles(x["template"], where) for x in t if isinstance(x, dict)
                     and isinstance(x.get("name"), str) and isinstance(x.get("template"), str)}
        elif isinstance(t, str):
            return _compiles(t, where)
    if named:
        if "default" not in named:
            raise ConfigError(f"{where}: named chat templates {sorted(named)} but none named 'default', which a "
                              "conversation without tools renders with")
        return named["default"] if len(named) == 1 else named
    kind = _json_field(root / "config.json", "model_type") if is_hf_model_dir(root) else _run_model_type(root)
    return ENCODINGS.get(kind) if isinstance(kind, str) else None


def _compiles(template: str, where: Path) -> str:
    """``template`` (read from ``where``) once it compiles: else a one-line ``ConfigError`` naming the file and the
    line, before a command builds anything on it (flyer serve's HTTP process, a chat dataset)."""
    import jinja2

    try:
        chat_renderer(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{where}: the chat template does not compile (line {e.lineno}: {e.message})") from None
    return template


def _run_model_type(step: Path) -> str | None:
    """The ``model_type`` a flyer run's model exports as (``flyer.interop.export_config.hf_model_type``; None when
    it has none): a run fine-tuned from a V3.2 / V4 directory carries its tokenizer settings, not its config.json."""
    try:
        return hf_model_type(ModelConfig.from_dict(json.loads((step / "config.json").read_text())))
    except (OSError, ValueError, TypeError, ConfigError):
        return None


def _json_field(path: Path, key: str):
    """``key`` of the JSON object in ``path``; None when unreadable, not JSON or not an object."""
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
