"""Network topologies built from one switch radix ``k``: closed-form sizes, costs and graphs.

Closed forms (``k``-port switches; *links* are switch-to-switch cables, endpoint cables apart):

=======  ==========================  ======================  =========================
name     endpoints                   switches                links
=======  ==========================  ======================  =========================
ft2      k^2/2                       3k/2                    k^2/2
mpft     P k^2/2 (P two-tier planes) P 3k/2                  P k^2/2
mrft     k^2/2 (leaves split by rail) 3k/2                   k^2/2
ft3      k^3/4                       5k^2/4                  k^3/2
sf       2 q^2 p                     2 q^2                   q^2 (3q - d)/2
df       a p g                       a g                     g a(a-1)/2 + g a h/2
=======  ==========================  ======================  =========================

Slim Fly uses the MMS construction: q = 4w + d with d in {-1, 0, 1}, network radix
k' = (3q - d)/2, p = ceil(k'/2) endpoints per router. A graph exists only when q is a prime
power; ``slim_fly_graph`` builds it for prime q. Dragonfly: a routers per group (all-to-all),
p endpoints and h global links per router, g groups (at most a h + 1); global links are
``a h g / 2``.

Cost = switches x (per_port x k + base) + endpoints x endpoint_link + links x switch_link.
The default switch price is the router model of the Slim Fly paper (Besta & Hoefler, SC'14:
350.4 k - 892.3 USD), whose methodology the ISCA paper follows; the two cable prices (981 and
2,405 USD) are a fit that reproduces the ISCA paper's per-endpoint costs within about 1 %.

Errors name Slim Fly's q ``sf_q`` and Dragonfly's a, p, h, g ``df_a`` .. ``df_g``, as ``compare`` does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import networkx as nx

from flyer.errors import FieldError


PAPER_RADIX = 64  # the ISCA paper's switches (400G, 64 ports): its Table 3 and flyer net topology's default


@dataclass(frozen=True)
class Prices:
    switch_per_port: float = 350.4
    switch_base: float = -892.3
    endpoint_link: float = 981.0
    switch_link: float = 2405.0

    def switch(self, radix: int) -> float:
        return self.switch_per_port * radix + self.switch_base


@dataclass(frozen=True)
class Topology:
    name: str
    description: str
    radix: int  # ports each switch uses
    endpoints: int
    switches: int
    links: int  # switch-to-switch
    diameter: int  # switch hops between the farthest pair of switches with endpoints
    params: dict
    note: str = ""
    switch_radix: int = 0  # ports of the switch bought (>= radix); 0 = radix

    def cost(self, prices: Prices) -> float:
        return (self.switches * prices.switch(self.switch_radix or self.radix) + self.endpoints * prices.endpoint_link
                + self.links * prices.switch_link)

    def as_dict(self, prices: Prices) -> dict:
        c = self.cost(prices)
        d = asdict(self)
        d.update(cost_usd=c, cost_per_endpoint_usd=c / self.endpoints)
        return d


def _even_radix(k: int) -> None:
    if k < 4 or k % 2:
        raise FieldError("radix", f"must be an even number >= 4 (got {k})")


# ---- closed forms -------------------------------------------------------------------------------
def fat_tree2(k: int) -> Topology:
    _even_radix(k)
    return Topology("ft2", "two-tier fat tree", k, k * k // 2, 3 * k // 2, k * k // 2, 2, {})


def multi_plane(k: int, planes: int) -> Topology:
    _even_radix(k)
    if planes < 1:
        raise FieldError("planes", f"must be >= 1 (got {planes})")
    t = fat_tree2(k)
    return Topology("mpft", f"multi-plane fat tree ({planes} two-tier planes)", k, planes * t.endpoints,
                    planes * t.switches, planes * t.links, 2, {"planes": planes},
                    "endpoints on different planes talk through a forward inside their node")


def multi_rail(k: int, rails: int) -> Topology:
    _even_radix(k)
    if rails < 1 or k % rails:
        raise FieldError("rails", f"must divide the switch radix {k} (got {rails})")
    t = fat_tree2(k)
    return Topology("mrft", f"multi-rail two-tier fat tree ({rails} rails)", k, t.endpoints, t.switches,
                    t.links, 2, {"rails": rails}, "NIC i of every node on the leaves of rail i")


def fat_tree3(k: int) -> Topology:
    _even_radix(k)
    return Topology("ft3", "three-tier fat tree", k, k**3 // 4, 5 * k * k // 4, k**3 // 2, 4, {})


def slim_fly_delta(q: int) -> int:
    r = q % 4
    if r == 2:
        raise FieldError("sf_q", f"must be 4w-1, 4w or 4w+1 (got {q})")
    return {0: 0, 1: 1, 3: -1}[r]


def smallest_factor(n: int) -> int:
    """The smallest prime factor of ``n`` >= 2, by trial division up to sqrt(n)."""
    return next((d for d in range(2, math.isqrt(n) + 1) if n % d == 0), n)


def is_prime_power(n: int) -> bool:
    if n < 2:
        return False
    p = smallest_factor(n)
    while n % p == 0:
        n //= p
    return n == 1


def slim_fly(q: int) -> Topology:
    delta = slim_fly_delta(q)
    net = (3 * q - delta) // 2
    p = math.ceil(net / 2)
    note = ("" if is_prime_power(q) else
            f"q = {q} is not a prime power: no MMS graph exists, the closed form is evaluated as the ISCA paper does")
    return Topology("sf", "Slim Fly (MMS)", net + p, 2 * q * q * p, 2 * q * q, q * q * net, 2,
                    {"q": q, "delta": delta, "network_radix": net, "p": p}, note)


def slim_fly_q_for_radix(k: int, prime_power: bool = False) -> int:
    """The largest admissible q whose routers fit in ``k`` ports (optionally a prime power).
    Router radix grows with q and is at least (9q - 3)/4, so the search walks down from
    q = (4k + 3)/9 and stops at the first fit (a few steps), rather than scanning every q."""
    for q in range((4 * k + 3) // 9 + 1, 2, -1):
        if q % 4 == 2 or (prime_power and not is_prime_power(q)):
            continue
        if slim_fly(q).radix <= k:
            return q
    raise FieldError("radix", f"{k} is too small for a Slim Fly")


def dragonfly(a: int, p: int, h: int, g: int) -> Topology:
    for name, value in (("df_a", a), ("df_p", p), ("df_h", h)):
        if value < 1:
            raise FieldError(name, f"must be >= 1 (got {value})")
    if not 2 <= g <= a * h + 1:
        raise FieldError("df_g", f"must be in [2, a*h+1 = {a * h + 1}] (got {g})")
    if (a * h * g) % 2:
        raise FieldError("df_g", f"must make a*h*g even (got a={a}, h={h}, g={g})")
    links = g * a * (a - 1) // 2 + a * h * g // 2
    note = "" if g == a * h + 1 else f"g = {g} < a*h+1 = {a * h + 1}: some group pairs share more than one global link"
    return Topology("df", "canonical Dragonfly", a - 1 + p + h, a * p * g, a * g, links, 3,
                    {"a": a, "p": p, "h": h, "g": g}, note)


def dragonfly_for_radix(k: int) -> tuple[int, int, int, int]:
    """The ISCA paper's instance: a = k/2, p = h = k/4, g = a h - 1 (511 groups at k = 64)."""
    if k < 8 or k % 4:
        raise FieldError("radix", f"must be a multiple of 4 >= 8 for the default Dragonfly (got {k})")
    a, p = k // 2, k // 4
    return a, p, p, a * p - 1


def compare(k: int = PAPER_RADIX, planes: int = 8, sf_q: int | None = None, df: tuple[int, int, int, int] | None = None,
            names: tuple[str, ...] = ("ft2", "mpft", "ft3", "sf", "df"), rails: int = 8) -> list[Topology]:
    """The ISCA paper's comparison (its Table 3) at radix ``k``."""
    build = {
        "ft2": lambda: fat_tree2(k),
        "mpft": lambda: multi_plane(k, planes),
        "mrft": lambda: multi_rail(k, rails),
        "ft3": lambda: fat_tree3(k),
        "sf": lambda: slim_fly(sf_q if sf_q is not None else slim_fly_q_for_radix(k)),
        "df": lambda: dragonfly(*(df or dragonfly_for_radix(k))),
    }
    if not names:
        raise FieldError("topologies", f"must name at least one topology (choose from: {', '.join(build)})")
    out = []
    for n in names:
        if n not in build:
            raise FieldError("topologies", f"unknown topology '{n}' (choose from: {', '.join(build)})")
        t = build[n]()
        if t.radix > k:
            raise FieldError("radix", f"{n} needs {t.radix}-port switches, more than {k}")
        out.append(dataclasses.replace(t, switch_radix=k))
    return out


# ---- graphs (small instances) -------------------------------------------------------------------
# Vertices are tuples whose first item is the kind: ("ep", ...) endpoints, anything else a switch.
def _add_endpoints(G: nx.Graph, switch, first: int, n: int, prefix=()) -> None:
    for i in range(first, first + n):
        G.add_edge(("ep", *prefix, i), switch)


def fat_tree2_graph(k: int, prefix: tuple = ()) -> nx.Graph:
    """k leaves x k/2 endpoints, k/2 spines, every leaf wired to every spine. Endpoint ids run leaf by leaf: read
    rail-major (endpoint ``r * (E/rails) + n`` NIC r of node n), rail r owns leaves ``r*k/rails .. (r+1)*k/rails - 1``.
    """
    _even_radix(k)
    G = nx.Graph()
    half = k // 2
    for leaf in range(k):
        _add_endpoints(G, ("leaf", *prefix, leaf), leaf * half, half, prefix)
        for s in range(half):
            G.add_edge(("leaf", *prefix, leaf), ("spine", *prefix, s))
    return G


def multi_plane_graph(k: int, planes: int) -> nx.Graph:
    """P disjoint two-tier planes; endpoint ("ep", plane, n) is NIC ``plane`` of node ``n``."""
    G = nx.Graph()
    for p in range(planes):
        G.update(fat_tree2_graph(k, prefix=(p,)))
    return G


def fat_tree3_graph(k: int) -> nx.Graph:
    """k pods of k/2 edge and k/2 aggregation switches; (k/2)^2 cores; agg j of a pod reaches
    cores j*k/2 .. (j+1)*k/2 - 1."""
    _even_radix(k)
    G = nx.Graph()
    half = k // 2
    for pod in range(k):
        for e in range(half):
            edge = ("edge", pod, e)
            _add_endpoints(G, edge, (pod * half + e) * half, half)
            for a in range(half):
                G.add_edge(edge, ("agg", pod, a))
        for a in range(half):
            for c in range(half):
                G.add_edge(("agg", pod, a), ("core", a * half + c))
    return G


def _primitive_root(q: int) -> int:
    for x in range(2, q):
        if len({pow(x, e, q) for e in range(1, q)}) == q - 1:
            return x
    return 1  # q = 2


def slim_fly_graph(q: int) -> nx.Graph:
    """MMS Slim Fly for a prime ``q``: routers (0, x, y) and (1, m, c) over GF(q), with
    ceil(k'/2) endpoints each. (0,x,y)~(0,x,y') if y-y' in X; (1,m,c)~(1,m,c') if c-c' in X';
    (0,x,y)~(1,m,c) if y = m x + c."""
    if q < 2 or smallest_factor(q) != q:
        raise FieldError("sf_q", f"slim_fly_graph builds prime q only (got {q})")
    delta = slim_fly_delta(q)
    xi = _primitive_root(q)
    pw = [pow(xi, e, q) for e in range(q - 1)]
    if delta == 1:
        X = {pw[e] for e in range(0, q - 1, 2)}
        Xp = {pw[e] for e in range(1, q - 1, 2)}
    elif delta == -1:
        w = (q + 1) // 4
        X = {pw[e] for e in range(0, 2 * w - 1, 2)} | {pw[e] for e in range(2 * w - 1, 4 * w - 2, 2)}
        Xp = {pw[e] for e in range(1, 2 * w, 2)} | {pw[e % (q - 1)] for e in range(2 * w, 4 * w - 1, 2)}
    else:
        raise FieldError("sf_q", f"slim_fly_graph needs an odd prime q (got {q})")
    G = nx.Graph()
    for x in range(q):
        for y in range(q):
            for y2 in range(q):
                if (y - y2) % q in X:
                    G.add_edge(("r0", x, y), ("r0", x, y2))
                if (y - y2) % q in Xp:
                    G.add_edge(("r1", x, y), ("r1", x, y2))
    for x in range(q):
        for m in range(q):
            for c in range(q):
                G.add_edge(("r0", x, (m * x + c) % q), ("r1", m, c))
    p = slim_fly(q).params["p"]
    for i, r in enumerate(sorted(n for n in G if n[0] in ("r0", "r1"))):
        _add_endpoints(G, r, i * p, p)
    return G


def dragonfly_graph(a: int, p: int, h: int, g: int) -> nx.Graph:
    """Groups of ``a`` fully connected routers; global port i = r h + j of group G goes to group
    G + (i mod (g-1)) + 1, landing on the port there that points back (needs (g-1) | a h)."""
    dragonfly(a, p, h, g)  # validates
    ah = a * h
    if ah % (g - 1):
        raise FieldError("df_g", f"dragonfly_graph needs g-1 to divide a*h (got a*h={ah}, g={g})")
    G = nx.MultiGraph()
    for grp in range(g):
        for r in range(a):
            _add_endpoints(G, ("router", grp, r), (grp * a + r) * p, p)
            for r2 in range(r + 1, a):
                G.add_edge(("router", grp, r), ("router", grp, r2))
    for grp in range(g):
        for i in range(ah):
            off = i % (g - 1) + 1
            dst = (grp + off) % g
            back = (g - off) - 1 + (i // (g - 1)) * (g - 1)  # peer's port index with offset g - off
            if (grp, i) < (dst, back):
                G.add_edge(("router", grp, i // h), ("router", dst, back // h))
    return G


def graph_counts(G: nx.Graph) -> dict:
    """Endpoints, switches, switch-to-switch links and switch diameter of a built graph."""
    eps = [n for n in G if n[0] == "ep"]
    sw = [n for n in G if n[0] != "ep"]
    links = sum(1 for u, v in G.edges() if u[0] != "ep" and v[0] != "ep")
    S = nx.Graph(G.subgraph(sw))
    hosts = {v for e in eps for v in G[e]}  # switches with endpoints attached
    diameter = 0
    for u in hosts:  # a fat tree's spines host no endpoints, so measure between hosting switches
        dist = nx.single_source_shortest_path_length(S, u)  # within u's plane for a multi-plane tree
        diameter = max(diameter, max(dist[v] for v in hosts if v in dist))
    return {"endpoints": len(eps), "switches": len(sw), "links": links, "diameter": diameter,
            "max_radix": max(G.degree(n) for n in sw)}


def cut_links(G: nx.Graph, side_a: list) -> int:
    """Max flow (unit-capacity links) from the endpoints in ``side_a`` to all other endpoints:
    the number of links that must carry traffic across this partition."""
    D = nx.DiGraph()
    for u, v, *_ in G.edges(keys=True) if G.is_multigraph() else G.edges():
        for x, y in ((u, v), (v, u)):
            cap = D[x][y]["capacity"] + 1 if D.has_edge(x, y) else 1
            D.add_edge(x, y, capacity=cap)
    a = set(side_a)
    for e in (n for n in G if n[0] == "ep"):
        if e in a:
            D.add_edge("src", e, capacity=1)
        else:
            D.add_edge(e, "dst", capacity=1)
    return int(nx.maximum_flow_value(D, "src", "dst"))


def bisection_links(t: Topology) -> int | None:
    """Links crossing the natural halving (half the leaves / pods / groups); None if unknown.

    Fat trees are non-blocking, so half the endpoints' worth; a Dragonfly split into
    floor(g/2) and ceil(g/2) groups crosses one bundle of a h/(g-1) global links per group pair.
    """
    if t.name in ("ft2", "mpft", "mrft", "ft3"):
        return t.endpoints // 2
    if t.name == "df":
        a, p, h, g = (t.params[x] for x in "aphg")
        if (a * h) % (g - 1):
            return None
        return min((g // 2) * (g - g // 2) * (a * h // (g - 1)), (g // 2) * a * p)
    return None
