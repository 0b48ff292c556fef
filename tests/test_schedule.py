"""The phase planner and the step clock, on their own."""

from hypothesis import given, strategies as st

from adaspa_compile import AdaSpaConfig
from adaspa_compile.schedule import Phase, Plan, SiteFacts, StepClock, plan_phase

CFG = AdaSpaConfig(search_steps=(2, 5))


def run_site(steps_run, cfg=CFG):
    """Plan every step a site runs (a step cache may skip some) as the site would: a search
    records its step, a fused search caches an LSE. Returns the phase letters."""
    facts, letters = SiteFacts(), []
    for step in steps_run:
        phase = plan_phase(step, 0, facts, cfg).phase
        letters.append(phase.letter)
        if phase in (Phase.FUSED_SEARCH, Phase.CACHED_SEARCH):
            facts = SiteFacts(searched_at=step,
                              has_lse=facts.has_lse or phase is Phase.FUSED_SEARCH)
    return "".join(letters)


def test_the_paper_schedule():
    assert run_site(range(8)) == "DDFSSCSS"
    assert run_site(range(8), CFG.replace(lse_cache=False)) == "DDFSSFSS"


def test_a_site_that_missed_a_search_step_searches_at_its_next_run():
    assert run_site([0, 1, 3, 4, 6, 7]) == "DDFSCS"  # skipped both search steps
    assert run_site([6, 7]) == "FS"  # joins after the last search step: its own fused search


@given(st.sets(st.integers(0, 12), min_size=1))
def test_one_search_per_search_interval_it_runs_in(steps):
    steps = sorted(steps)
    letters = run_site(steps)
    for step, letter in zip(steps, letters):
        assert (letter == "D") == (step < 2)
    searches = [s for s, letter in zip(steps, letters) if letter in "FC"]
    intervals = {0 if s < 5 else 1 for s in steps if s >= 2}
    assert len(searches) == len(intervals)
    assert letters.replace("D", "")[:1] in ("", "F")  # the first search is fused


def test_overrides():
    searched = SiteFacts(searched_at=2, has_lse=True)
    assert plan_phase(3, 0, searched, CFG) == Plan(Phase.SPARSE)
    assert plan_phase(3, 1, searched, CFG) == Plan(Phase.SPARSE, mask_of=1)
    assert plan_phase(3, 0, SiteFacts(searched_at=2, dense_reason="x"), CFG).phase is Phase.DENSE
    assert plan_phase(2, 0, SiteFacts(padding_mask=False), CFG).phase is Phase.DENSE


def test_cfg_mask_cond_runs_later_branches_on_branch_0s_mask():
    cond = CFG.replace(cfg_mask="cond")
    assert plan_phase(2, 1, SiteFacts(lead_mask=True), cond) == Plan(Phase.SPARSE, mask_of=0)
    assert plan_phase(5, 1, SiteFacts(searched_at=2, has_lse=True, lead_mask=True),
                      cond) == Plan(Phase.SPARSE, mask_of=0)
    assert plan_phase(1, 1, SiteFacts(lead_mask=True), cond).phase is Phase.DENSE
    assert plan_phase(2, 1, SiteFacts(lead_mask=True), CFG) == Plan(Phase.FUSED_SEARCH, mask_of=1)
    assert plan_phase(2, 1, SiteFacts(), cond) == Plan(Phase.FUSED_SEARCH, mask_of=1)


def test_cfg_mask_sum_selects_later_branches_on_the_summed_mass():
    total = CFG.replace(cfg_mask="sum")
    assert plan_phase(2, 0, SiteFacts(), total) == Plan(Phase.FUSED_SEARCH, keep_mass=True)
    assert plan_phase(5, 0, SiteFacts(searched_at=2, has_lse=True), total) == Plan(
        Phase.CACHED_SEARCH, keep_mass=True)
    assert plan_phase(2, 1, SiteFacts(lead_mass=True), total) == Plan(
        Phase.FUSED_SEARCH, mask_of=1, sum_with=0)
    assert plan_phase(5, 1, SiteFacts(searched_at=2, has_lse=True, lead_mass=True),
                      total) == Plan(Phase.CACHED_SEARCH, mask_of=1, sum_with=0)
    # no mass of branch 0 at this step: the branch selects on its own
    assert plan_phase(2, 1, SiteFacts(), total) == Plan(Phase.FUSED_SEARCH, mask_of=1)
    # between searches each branch runs its own copy of the one mask
    assert plan_phase(3, 1, SiteFacts(searched_at=2, lead_mass=True), total) == Plan(
        Phase.SPARSE, mask_of=1)


def test_clock_counts_steps_branches_and_generations():
    clock = StepClock()
    seen = []
    for t in (900.0, 900.0, 800.0, 800.0, 700.0, 950.0):
        new = clock.observe(t, ("x",))
        seen.append((new, clock.generation, clock.step, clock.branch))
    assert seen == [(True, 0, 0, 0), (False, 0, 0, 1), (False, 0, 1, 0), (False, 0, 1, 1),
                    (False, 0, 2, 0), (True, 1, 0, 0)]
    assert clock.observe(950.0, ("y",))  # new input shapes: a new generation


def test_clock_takes_the_scheduler_step():
    clock = StepClock()
    assert clock.observe(700.0, (), scheduler_step=7) and (clock.step, clock.branch) == (7, 0)
    assert not clock.observe(700.0, (), scheduler_step=7) and clock.branch == 1
    assert not clock.observe(650.0, (), scheduler_step=8) and (clock.step, clock.branch) == (8, 0)
    assert clock.observe(640.0, (), scheduler_step=3)  # an earlier step: a new generation
    assert clock.steps_from == "scheduler"
