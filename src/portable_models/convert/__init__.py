"""Convert: every target is reached by routes (chains of converter steps), tried in order;
one module per route family, one row per route in :mod:`.registry`; :mod:`.build` builds one
target (its attempts, their cache, the check of each artifact). Other stages use the names
below, never the modules inside."""

from portable_models.convert.base import RouteInfo
from portable_models.convert.registry import (
    EXTRA_ROUTES_ENV,
    ROUTES,
    all_routes,
    route_by_name,
    routes_for,
)

__all__ = ["EXTRA_ROUTES_ENV", "ROUTES", "RouteInfo", "all_routes", "route_by_name", "routes_for"]
