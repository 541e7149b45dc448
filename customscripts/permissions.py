"""Who may use which script version (DESIGN 3.2). Pure functions: callers supply the facts.

Rules, in order:
1. the caller's tier (configuration) must include the `custom_scripts` feature;
2. the owner may use every version of their script, the draft included;
3. nobody else ever uses a draft;
4. inside the script's tenant: a team or org of the caller listed in `permissions.teams/orgs`,
   the caller in `permissions.allowed_users`, or a marketplace subscription grants use;
5. across tenants only a marketplace subscription grants use, and only for published versions
   whose `permissions.marketplace` is true (the subscriber runs it in their own tenant and never
   sees the source);
6. for everyone but the owner, non-empty `permissions.tiers` / `permissions.features` further
   restrict (the caller's features are the tier's plus the token's `features` claim);
7. the script's current access policy governs every one of its versions: for everyone but the
   owner a version is usable only if its own permissions AND those of the script's latest
   published version allow it (`check_can_use_now`). Publishing a version without a user, or
   unlisted, therefore revokes every older version for them at once, and, through the closure
   check, every script that depends on it.

Listing a script on the marketplace (`permissions.marketplace: true`) needs the
`marketplace_publish` feature (`check_can_list`), wherever listing is set: create, edit, publish.

Denials raise Forbidden with a machine-readable code; `hidden=True` on the error marks a script
the caller must not even learn exists (another tenant's private script), which the API answers
with 404.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from customscripts.auth import Principal
from customscripts.config import CUSTOM_SCRIPTS_FEATURE, MARKETPLACE_PUBLISH_FEATURE, Settings, Tier, settings
from customscripts.errors import Forbidden


class PermissionsLike(Protocol):
    tiers: list[str]
    features: list[str]
    allowed_users: list[str]
    teams: list[str]
    orgs: list[str]
    marketplace: bool


class ScriptLike(Protocol):
    """What a check needs from a version: ScriptMeta and catalog rows both fit."""

    script_id: str
    owner_id: str
    tenant: str
    status: str
    permissions: PermissionsLike


class Denied(Forbidden):
    """A 403 that also says whether the script's existence may be revealed to the caller."""

    def __init__(self, message: str, *, code: str, hidden: bool = False) -> None:
        super().__init__(message, code=code)
        self.hidden = hidden


def tier_of(principal: Principal, cfg: Settings | None = None) -> Tier:
    """The caller's tier if it allows custom scripts at all; 403 otherwise (before any work)."""
    tier = (cfg or settings()).tier(principal.tier)
    if tier is None or CUSTOM_SCRIPTS_FEATURE not in tier.features:
        raise Denied(f"tier {principal.tier!r} does not include the {CUSTOM_SCRIPTS_FEATURE} feature",
                     code="tier_not_allowed")
    return tier


def is_owner(principal: Principal, script: ScriptLike) -> bool:
    return principal.user_id == script.owner_id and principal.tenant == script.tenant


def check_can_use(principal: Principal, script: ScriptLike, version: int | str | None = None, *,
                  subscribed: bool = False, cfg: Settings | None = None) -> None:
    """Raise Denied unless `principal` may use `script` at `version` (default: the script's own)."""
    tier = tier_of(principal, cfg)
    if is_owner(principal, script):
        return
    label = f"{script.script_id}@{version if version is not None else getattr(script, 'version', '?')}"
    published = script.status == "published" and version != "draft"
    perms = script.permissions
    same_tenant = principal.tenant == script.tenant
    if same_tenant:
        granted = (
            principal.user_id in perms.allowed_users
            or bool(principal.teams.intersection(perms.teams))
            or bool(principal.orgs.intersection(perms.orgs))
            or (subscribed and perms.marketplace)
        )
        if not published:
            raise Denied(f"{label} is not a published version", code="not_published")
        if not granted:
            raise Denied(f"not entitled to script {script.script_id}", code="not_entitled")
    else:
        listed = perms.marketplace and published
        if not (listed and subscribed):
            # Another tenant's script: private ones are invisible; listed ones need a subscription.
            raise Denied(f"not entitled to script {script.script_id}",
                         code="not_subscribed" if listed else "not_entitled", hidden=not listed)
    if perms.tiers and principal.tier not in perms.tiers:
        raise Denied(f"script {script.script_id} is restricted to tiers {sorted(perms.tiers)}",
                     code="tier_restricted")
    held = tier.features | principal.features
    missing = sorted(set(perms.features) - held)
    if missing:
        raise Denied(f"script {script.script_id} requires features {missing}", code="feature_restricted")


def check_can_use_now(principal: Principal, script: ScriptLike, current: ScriptLike | None, *,
                      subscribed: bool = False, cfg: Settings | None = None) -> None:
    """check_can_use for a published version under the script's current policy (rule 7): `current`
    is the script's latest published version (None: it has none, the version's own rules apply)."""
    version = getattr(script, "version", None)
    check_can_use(principal, script, version, subscribed=subscribed, cfg=cfg)
    if current is not None and getattr(current, "version", None) != version:
        check_can_use(principal, current, getattr(current, "version", None), subscribed=subscribed, cfg=cfg)


def check_can_list(principal: Principal, cfg: Settings | None = None) -> None:
    """Listing on the marketplace needs `marketplace_publish` (the tier's features or the token's)."""
    tier = tier_of(principal, cfg)
    if MARKETPLACE_PUBLISH_FEATURE not in tier.features | principal.features:
        raise Denied(f"listing a script on the marketplace needs the {MARKETPLACE_PUBLISH_FEATURE} feature",
                     code="marketplace_publish_required")


def check_dependency_closure(principal: Principal, closure: Iterable[ScriptLike], *,
                             subscribed: Callable[[str], bool] | Iterable[str] = (),
                             current: Mapping[str, ScriptLike] | None = None,
                             cfg: Settings | None = None) -> None:
    """Every member of a dependency closure must be usable by the same caller, else 403 naming it.

    `subscribed` is the set of script ids the caller holds marketplace subscriptions for (or a
    predicate); `current` maps script ids to their latest published version (rule 7). Hidden
    denials of dependencies still become a plain 403: the caller asked for the root, which they may
    see, and learns only that a dependency is not available to them.
    """
    is_subscribed = subscribed if callable(subscribed) else set(subscribed).__contains__
    for member in closure:
        version = getattr(member, "version", None)
        try:
            check_can_use_now(principal, member, (current or {}).get(member.script_id),
                              subscribed=is_subscribed(member.script_id), cfg=cfg)
        except Denied as exc:
            raise Denied(f"dependency {member.script_id}@{version} is not usable: {exc.message}",
                         code="dependency_forbidden") from None
