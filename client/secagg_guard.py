"""SecAgg+ parameters checked at the site, before Flower's ``secaggplus_mod`` acts on them.

Flower's client mod trusts the coordinator's stage configs: its ``_unmask``
accepts any reconstruction threshold, any group size and a node listed as both
active and dead. A coordinator that lists a node as dead to some share holders
and as active to others (or uses a threshold of at most half the group, so two
disjoint sets of holders each reach it) obtains both that node's private-mask
seed and its pairwise-mask key, and so its update in the clear. This module
refuses such a round at this site:

* setup: ``threshold`` > half of ``share_num`` (the group a secret is shared in),
  ``threshold / share_num`` >= ``FEDSYNTH_SITE_MIN_SECAGG_THRESHOLD``,
  ``share_num`` >= ``FEDSYNTH_SITE_MIN_SECAGG_GROUP_SIZE``, ``threshold`` <=
  ``share_num`` <= ``sample_num`` and ``sample_num`` >= ``FEDSYNTH_SITE_MIN_SITES``;
* share keys: the public keys of at least ``FEDSYNTH_SITE_MIN_SECAGG_GROUP_SIZE``
  and at most ``share_num`` nodes, this node among them;
* unmask: no node both active and dead, and this node (which sent its masked
  vector) not dead.

:func:`secagg_problems` is pure; :func:`guard_mod` is the ClientApp mod that runs it
and, on any problem, logs it, writes ``update_rejected`` (reason
``secagg_params``) to the site's audit log and raises an exception with fixed text
(this site drops out; Flower forwards exception text to the coordinator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from shared.errors import Problem
from shared.settings import SiteSettings

log = logging.getLogger("fedsynth.site.secagg")

REFUSAL_REASON = "secagg_params"


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def secagg_problems(
    stage: Any, configs: Mapping[str, Any], state: Mapping[str, Any], *, own_nid: int,
    settings: SiteSettings,
) -> list[Problem]:
    """Every reason this site must not take part in this SecAgg+ stage (empty = go on).

    ``configs`` is the stage's config record (``secaggplus_configs``), ``state`` the
    mod's saved state from earlier stages (``secaggplus_state``: ``share_num``,
    ``threshold`` after setup), ``own_nid`` this node's id.
    """
    p: list[Problem] = []
    if stage == Stage.SETUP:
        n, share, t = (_int(configs.get(k)) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
        if n is None or share is None or t is None:
            return [Problem("secagg.setup", "sample_num, share_num and threshold must be integers")]
        if 2 * t <= share:
            p.append(Problem("secagg.threshold", f"{t} is not above half of the {share} share holders"))
        if t < settings.min_secagg_threshold * share:
            p.append(Problem("secagg.threshold",
                             f"{t}/{share} is below FEDSYNTH_SITE_MIN_SECAGG_THRESHOLD="
                             f"{settings.min_secagg_threshold:g}"))
        if t > share:
            p.append(Problem("secagg.threshold", f"{t} is above the {share} share holders"))
        if share < settings.min_secagg_group_size:
            p.append(Problem("secagg.share_num", f"{share} share holders is below "
                                                 f"FEDSYNTH_SITE_MIN_SECAGG_GROUP_SIZE={settings.min_secagg_group_size}"))
        if share > n:
            p.append(Problem("secagg.share_num", f"{share} share holders but only {n} sampled nodes"))
        if n < settings.min_sites:
            p.append(Problem("secagg.sample_num", f"{n} sampled nodes is below "
                                                  f"FEDSYNTH_SITE_MIN_SITES={settings.min_sites}"))
    elif stage == Stage.SHARE_KEYS:
        share = _int(state.get("share_num"))
        try:
            holders = {int(k) for k in configs if k != Key.STAGE}
        except (TypeError, ValueError):
            return [Problem("secagg.share_keys", "node ids must be integers")]
        if len(holders) < settings.min_secagg_group_size:
            p.append(Problem("secagg.share_keys", f"keys of {len(holders)} nodes is below "
                                                  f"FEDSYNTH_SITE_MIN_SECAGG_GROUP_SIZE={settings.min_secagg_group_size}"))
        if share is None or len(holders) > share:
            p.append(Problem("secagg.share_keys", f"keys of {len(holders)} nodes but share_num is {share}"))
        if own_nid not in holders:
            p.append(Problem("secagg.share_keys", "this node's own keys are not in the group"))
    elif stage == Stage.UNMASK:
        active, dead = configs.get(Key.ACTIVE_NODE_ID_LIST), configs.get(Key.DEAD_NODE_ID_LIST)
        if not isinstance(active, list) or not isinstance(dead, list):
            return [Problem("secagg.unmask", "active and dead node lists are required")]
        both = sorted(set(active) & set(dead), key=str)
        if both:
            p.append(Problem("secagg.unmask", f"{len(both)} node(s) listed as both active and dead"))
        if own_nid in dead:
            p.append(Problem("secagg.unmask", "this node is listed as dead after sending its masked vector"))
        if len(set(active)) != len(active) or len(set(dead)) != len(dead):
            p.append(Problem("secagg.unmask", "a node is listed twice"))
    return p


def guard_mod(
    message: Message, context: Context, call_next: Callable[[Message, Context], Message], *,
    settings: Callable[[Context], SiteSettings], audit: Callable[[SiteSettings], Any] | None = None,
    declined: Callable[[], Exception],
) -> Message:
    """Check the SecAgg+ stage in ``message`` against the site's settings, then ``call_next``.

    ``settings(context)`` reads the site's settings; ``audit(settings)`` returns its
    audit log (best effort); ``declined()`` builds the fixed-text exception raised
    on refusal (the site drops out of the round).
    """
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = configs.get(Key.STAGE) if configs is not None else None
    state = context.state.config_records.get(RECORD_KEY_STATE)
    try:
        site = settings(context)
    except Exception as exc:
        log.exception("secagg: no site settings; dropping out of the round")
        raise declined() from exc
    own = int(message.metadata.dst_node_id)
    problems = secagg_problems(stage, configs if configs is not None else {},
                               state if state is not None else {}, own_nid=own, settings=site)
    if not problems:
        return call_next(message, context)
    log.error("secagg stage %s refused (this site drops out): %s", stage,
              "; ".join(str(p) for p in problems))
    if audit is not None:
        try:
            audit(site).append("update_rejected", {
                "phase": "train", "reason": REFUSAL_REASON, "stage": str(stage)[:40],
                "problems": [str(p)[:200] for p in problems]})
        except Exception:  # the error line above is the record of last resort
            log.exception("could not write the secagg refusal to the site's audit log")
    raise declined()
