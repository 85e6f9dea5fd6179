"""Topology closed forms: the ISCA paper's table, and graphs built with networkx."""

import pytest

from flyer.cluster import topology as T
from flyer.errors import FieldError


@pytest.fixture(scope="module")
def table():
    return {t.name: t.as_dict(T.Prices()) for t in T.compare(64)}


def test_isca_table_counts(table):
    want = {  # ISCA paper, 64-port switches: endpoints, switches, switch-to-switch links
        "ft2": (2048, 96, 2048), "mpft": (16384, 768, 16384), "ft3": (65536, 5120, 131072),
        "sf": (32928, 1568, 32928), "df": (261632, 16352, 384272),
    }
    for name, counts in want.items():
        assert (table[name]["endpoints"], table[name]["switches"], table[name]["links"]) == counts, name


def test_isca_table_costs(table):
    want = {"ft2": 4.39e3, "mpft": 4.39e3, "ft3": 7.5e3, "sf": 4.4e3, "df": 5.8e3}  # USD per endpoint
    for name, c in want.items():
        assert table[name]["cost_per_endpoint_usd"] == pytest.approx(c, rel=0.011), name
    saving = 1 - table["mpft"]["cost_per_endpoint_usd"] / table["ft3"]["cost_per_endpoint_usd"]
    assert saving == pytest.approx(0.41, abs=0.01)  # "about 41% cheaper per endpoint"


def test_paper_instances_and_notes(table):
    assert table["sf"]["params"]["q"] == 28 and "not a prime power" in table["sf"]["note"]
    assert T.slim_fly_q_for_radix(64, prime_power=True) == 27
    assert table["df"]["params"] == {"a": 32, "p": 16, "h": 16, "g": 511}
    assert table["mpft"]["params"]["planes"] == 8
    assert all(t["radix"] <= 64 for t in table.values())


@pytest.mark.parametrize("k", [4, 8, 12])
def test_fat_trees_graph_vs_closed_form(k):
    for closed, G in ((T.fat_tree2(k), T.fat_tree2_graph(k)), (T.multi_plane(k, 3), T.multi_plane_graph(k, 3)),
                      (T.fat_tree3(k), T.fat_tree3_graph(k))):
        got = T.graph_counts(G)
        assert (got["endpoints"], got["switches"], got["links"], got["diameter"]) == \
               (closed.endpoints, closed.switches, closed.links, closed.diameter), closed.name
        assert got["max_radix"] == k


@pytest.mark.parametrize("q", [5, 7, 11, 13])
def test_slim_fly_graph_vs_closed_form(q):
    closed, G = T.slim_fly(q), T.slim_fly_graph(q)
    got = T.graph_counts(G)
    assert (got["endpoints"], got["switches"], got["links"], got["diameter"]) == \
           (closed.endpoints, closed.switches, closed.links, 2)
    net = closed.params["network_radix"]
    assert all(sum(1 for v in G[n] if v[0] != "ep") == net for n in G if n[0] != "ep")  # k'-regular


@pytest.mark.parametrize("a, p, h, g", [(4, 2, 2, 9), (4, 2, 2, 5), (2, 1, 1, 3), (6, 3, 3, 19), (4, 2, 3, 7)])
def test_dragonfly_graph_vs_closed_form(a, p, h, g):
    closed, G = T.dragonfly(a, p, h, g), T.dragonfly_graph(a, p, h, g)
    got = T.graph_counts(G)
    assert (got["endpoints"], got["switches"], got["links"], got["max_radix"]) == \
           (closed.endpoints, closed.switches, closed.links, closed.radix)
    assert got["diameter"] == closed.diameter == 3  # local, global, local


def test_bisection_by_max_flow():
    for closed, G in ((T.fat_tree2(8), T.fat_tree2_graph(8)), (T.fat_tree3(8), T.fat_tree3_graph(8)),
                      (T.multi_plane(4, 2), T.multi_plane_graph(4, 2))):
        eps = sorted(n for n in G if n[0] == "ep")  # the first half of the leaves / pods per plane
        side = [e for e in eps if e[-1] < closed.endpoints // closed.params.get("planes", 1) // 2]
        assert T.cut_links(G, side) == T.bisection_links(closed)
    closed, G = T.dragonfly(4, 2, 2, 9), T.dragonfly_graph(4, 2, 2, 9)
    side = [e for e in G if e[0] == "ep" and e[1] < 4 * 4 * 2]  # groups 0-3 against 4-8
    assert T.cut_links(G, side) == T.bisection_links(closed) == 20


def test_topology_errors():
    with pytest.raises(FieldError, match="^radix: must be an even number"):
        T.fat_tree2(7)
    with pytest.raises(FieldError, match="^sf_q: "):
        T.slim_fly(6)
    with pytest.raises(FieldError, match="^df_g: "):
        T.dragonfly(4, 2, 2, 10)
    with pytest.raises(FieldError, match="^topologies: unknown topology 'torus'"):
        T.compare(64, names=("torus",))


def test_multi_rail_closed_form_is_one_two_tier_tree():
    """``multi_rail`` (mrft, which ``compare`` leaves out by default) is a two-tier tree's counts; its rails divide
    the radix."""
    t = T.multi_rail(64, 8)
    assert (t.endpoints, t.switches, t.links, t.diameter) == (2048, 96, 2048, 2)
    with pytest.raises(FieldError, match="^rails: must divide the switch radix 64"):
        T.multi_rail(64, 3)


def test_cost_prices_the_bought_switch_radix():
    """``compare`` prices the k-port switches bought even where a topology uses fewer ports (Slim Fly q=28 uses 63
    of 64)."""
    sf = {t.name: t for t in T.compare(64)}["sf"]
    assert sf.radix == 63 and sf.switch_radix == 64
    p = T.Prices()
    want = sf.switches * (p.switch_per_port * 64 + p.switch_base) + sf.endpoints * p.endpoint_link + \
        sf.links * p.switch_link
    assert sf.cost(p) == pytest.approx(want, rel=1e-12)


def test_dragonfly_needs_an_even_global_port_count():
    """A dragonfly's a*h*g global ports pair up into links: an odd count is refused."""
    with pytest.raises(FieldError, match="^df_g: must make a\\*h\\*g even"):
        T.dragonfly(3, 1, 1, 3)


def test_dragonfly_bisection_is_capped_by_injection_and_unknown_for_uneven_bundles():
    """With more global links than the endpoints can inject, the cut is the endpoints' (max flow agrees);
    the paper's instance (a h = 512 over g - 1 = 510 peers) has no uniform bundle: None, not a number."""
    closed, G = T.dragonfly(4, 1, 2, 9), T.dragonfly_graph(4, 1, 2, 9)
    side = [e for e in G if e[0] == "ep" and e[1] < 4 * 4 * 1]  # groups 0-3 against 4-8
    assert T.cut_links(G, side) == T.bisection_links(closed) == 16
    assert T.bisection_links(T.dragonfly(*T.dragonfly_for_radix(64))) is None


def test_compare_refuses_a_topology_wider_than_the_switch():
    """Slim Fly q = 29 needs 65-port routers: refused at radix 64."""
    with pytest.raises(FieldError, match="^radix: sf needs 65-port switches, more than 64"):
        T.compare(64, sf_q=29, names=("sf",))


def test_radix_below_four_is_refused():
    """A two-tier tree needs k >= 4 (k/2 up and k/2 down ports, k/2 >= 2 spines)."""
    with pytest.raises(FieldError, match="^radix: must be an even number >= 4"):
        T.fat_tree2(2)
