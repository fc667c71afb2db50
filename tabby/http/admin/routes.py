"""The admin and utility routes: models and LoRAs (:mod:`tabby.http.admin.models`),
chat templates, sampler overrides, tokenization, and the API documentation
(:mod:`tabby.http.docs`), mounted as one blueprint.

Permissions follow reference §1.3: reading needs an API key (the admin key sees
directory listings where an API key sees only what is active), changing needs the admin
key. Every change goes through the ModelManager, which owns the state.
"""

from __future__ import annotations

import functools
from typing import Any

import quart
import trio

from tabby.errors import InvalidRequest, TabbyError
from tabby.http import docs
from tabby.http.admin import models as admin_models
from tabby.http.admin.models import loaded_state, model_manager
from tabby.http.admin.schemas import (
    NameList,
    OverrideEntry,
    SamplingOverridesResponse,
    SamplingOverrideSwitchRequest,
    StatusResponse,
    TemplateSwitchRequest,
    TokenDecodeRequest,
    TokenDecodeResponse,
    TokenEncodeRequest,
    TokenEncodeResponse,
    to_json,
)
from tabby.http.auth import Permission, require
from tabby.http.body import parse_body
from tabby.http.openai.requests import chat_messages
from tabby.http.openapi import Route
from tabby.http.services import Services
from tabby.serving.planning import render_chat
from tabby.serving.requests import ChatRequest
from tabby.serving.state import ServingState
from tabby.serving.templating import strip_leading_bos

__all__ = ["ROUTES", "blueprint", "encode_tokens", "overrides_json"]

_OWN_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/templates", response=NameList, tag="templates",
          doc="List chat templates.\nAdmin key: every template in templates_dir; API key: "
          "the active one."),
    Route("GET", "/v1/template/list", response=NameList, tag="templates",
          doc="List chat templates (alias of /v1/templates)."),
    Route("POST", "/v1/template/switch", request=TemplateSwitchRequest,
          response=StatusResponse, auth="admin", tag="templates",
          doc="Serve another chat template from templates_dir."),
    Route("POST", "/v1/template/unload", response=StatusResponse, auth="admin",
          tag="templates",
          doc="Serve no chat template.\nChat completions are refused (422) until a switch "
          "or a load."),
    Route("GET", "/v1/sampling/overrides", response=SamplingOverridesResponse, tag="sampling",
          doc="The active sampler overrides.\nThe preset list is shown to the admin key only."),
    Route("GET", "/v1/sampling/override/list", response=SamplingOverridesResponse,
          tag="sampling", doc="The active sampler overrides (alias of /v1/sampling/overrides)."),
    Route("POST", "/v1/sampling/override/switch", request=SamplingOverrideSwitchRequest,
          response=StatusResponse, auth="admin", tag="sampling",
          doc="Select a sampler preset, or inline overrides.\nThe preset wins if both are "
          "given; 400 if neither."),
    Route("POST", "/v1/sampling/override/unload", response=StatusResponse, auth="admin",
          tag="sampling", doc="Clear the sampler overrides (preset and its name)."),
    Route("POST", "/v1/token/encode", request=TokenEncodeRequest,
          response=TokenEncodeResponse, tag="tokens",
          doc="Tokenize text, or chat messages rendered with the chat template.\nMessages "
          "are rendered with add_generation_prompt false; 422 without a template."),
    Route("POST", "/v1/token/decode", request=TokenDecodeRequest,
          response=TokenDecodeResponse, tag="tokens", doc="Turn token ids into text."),
)

ROUTES: tuple[Route, ...] = admin_models.ROUTES + _OWN_ROUTES


def overrides_json(preset: Any) -> dict[str, OverrideEntry]:
    """The active preset's overrides, keyed by sampler field."""
    if preset is None:
        return {}
    return {
        o.key: OverrideEntry(override=o.value, force=o.force, additive=o.additive)
        for o in preset.overrides
    }


def encode_tokens(body: TokenEncodeRequest, state: ServingState) -> list[int]:
    """Token ids of the text, or of the messages rendered with the chat template."""
    info, tokenizer = state.model, state.tokenizer
    assert info is not None
    assert tokenizer is not None
    if isinstance(body.text, str):
        text = body.text
    else:
        chat = ChatRequest(
            messages=chat_messages(body.text),
            add_generation_prompt=False,
            template_vars=body.template_vars,
        )
        text, _stops = render_chat(chat, state)
        text = strip_leading_bos(text, info.bos_token, body.add_bos_token)
    return tokenizer.encode(
        text, add_bos=body.add_bos_token, encode_special=body.encode_special_tokens
    )


def _add_template_routes(bp: quart.Blueprint, services: Services) -> None:
    async def template_list() -> dict[str, Any]:
        """List chat templates (admin: templates_dir; API key: the active one)."""
        permission = await require(Permission.API)
        if permission.grants(Permission.ADMIN):
            names = list(await model_manager(services).list("templates"))
        else:
            template = model_manager(services).serving_state().template
            names = [template.name] if template is not None else []
        return to_json(NameList(data=names))

    bp.add_url_rule("/v1/templates", "templates", template_list, methods=["GET"])
    bp.add_url_rule("/v1/template/list", "template_list", template_list, methods=["GET"])

    @bp.post("/v1/template/switch")
    async def template_switch() -> dict[str, Any]:
        """Serve another chat template."""
        await require(Permission.ADMIN)
        body = await parse_body(TemplateSwitchRequest)
        try:
            await model_manager(services).switch_template(body.prompt_template_name)
        except TabbyError as exc:
            # The template lookup names the load request's field; here it is this one.
            if exc.param == "prompt_template":
                exc.param = "prompt_template_name"
            raise
        return to_json(StatusResponse(status="switched"))

    @bp.post("/v1/template/unload")
    async def template_unload() -> dict[str, Any]:
        """Serve no chat template."""
        await require(Permission.ADMIN)
        await model_manager(services).unload_template()
        return to_json(StatusResponse(status="unloaded"))


def _add_sampling_routes(bp: quart.Blueprint, services: Services) -> None:
    async def overrides() -> dict[str, Any]:
        """The active sampler overrides."""
        permission = await require(Permission.API)
        state = model_manager(services).serving_state()
        presets: list[str] = []
        if permission.grants(Permission.ADMIN):
            presets = list(await model_manager(services).list("presets"))
        response = SamplingOverridesResponse(
            selected_preset=state.preset_name, overrides=overrides_json(state.preset),
            presets=presets,
        )
        return to_json(response)

    bp.add_url_rule("/v1/sampling/overrides", "overrides", overrides, methods=["GET"])
    bp.add_url_rule("/v1/sampling/override/list", "override_list", overrides, methods=["GET"])

    @bp.post("/v1/sampling/override/switch")
    async def override_switch() -> dict[str, Any]:
        """Select a sampler preset or inline overrides."""
        await require(Permission.ADMIN)
        body = await parse_body(SamplingOverrideSwitchRequest)
        if not body.preset and body.overrides is None:
            raise InvalidRequest("give a preset name or overrides", param="preset")
        await model_manager(services).switch_preset(body.preset or None, body.overrides)
        return to_json(StatusResponse(status="switched"))

    @bp.post("/v1/sampling/override/unload")
    async def override_unload() -> dict[str, Any]:
        """Clear the sampler overrides."""
        await require(Permission.ADMIN)
        await model_manager(services).unload_preset()
        return to_json(StatusResponse(status="unloaded"))


def _add_token_routes(bp: quart.Blueprint, services: Services) -> None:
    @bp.post("/v1/token/encode")
    async def token_encode() -> dict[str, Any]:
        """Tokenize text or chat messages."""
        await require(Permission.API)
        body = await parse_body(TokenEncodeRequest)
        # Rendering and tokenizing a long conversation is CPU work: off the event loop.
        tokens = await trio.to_thread.run_sync(encode_tokens, body, loaded_state(services))
        return to_json(TokenEncodeResponse(tokens=tokens, length=len(tokens)))

    @bp.post("/v1/token/decode")
    async def token_decode() -> dict[str, Any]:
        """Turn token ids into text."""
        await require(Permission.API)
        body = await parse_body(TokenDecodeRequest)
        state = loaded_state(services)
        tokenizer = state.tokenizer
        assert tokenizer is not None
        vocab = tokenizer.vocab_size
        for i, token in enumerate(body.tokens):
            if not 0 <= token < vocab:
                raise InvalidRequest(
                    f"token id {token} is outside the vocabulary (0 to {vocab - 1})",
                    param=f"tokens[{i}]",
                )
        text = await trio.to_thread.run_sync(
            functools.partial(
                tokenizer.decode, body.tokens, decode_special=body.decode_special_tokens
            )
        )
        return to_json(TokenDecodeResponse(text=text))


def blueprint(services: Services) -> quart.Blueprint:
    bp = quart.Blueprint("admin", __name__)
    admin_models.add_routes(bp, services)
    _add_template_routes(bp, services)
    _add_sampling_routes(bp, services)
    _add_token_routes(bp, services)
    docs.add_routes(bp, services)
    return bp
