"""Status mapping and reference resolution: pure functions, every branch."""

from __future__ import annotations

import asyncio
from collections.abc import Container
from typing import Any, cast

import pytest

from kubetune.controller import status as st
from kubetune.controller.references import resolve_references
from kubetune.controller.world import World
from kubetune_api.automodel import AutomodelJobSpec
from kubetune_api.status import Condition, ConditionType, FailureClass, JobStatus
from kubetune_api.unsloth import UnslothJobSpec


def _dumped(conditions: list[Condition]) -> list[dict[str, Any]]:
    return [cond.model_dump(mode="json", by_alias=True) for cond in conditions]


def test_set_condition_moves_transition_time_only_on_status_change() -> None:
    running = ConditionType.RUNNING
    conds = _dumped(st.set_condition(None, running, False, "Created", "m1", 1, "t1"))
    assert conds[0]["lastTransitionTime"] == "t1"
    conds = _dumped(st.set_condition(conds, running, False, "Unschedulable", "m2", 1, "t2"))
    assert conds[0]["lastTransitionTime"] == "t1" and conds[0]["reason"] == "Unschedulable"
    conds = _dumped(st.set_condition(conds, running, True, "Running", "m3", 2, "t3"))
    assert conds[0]["lastTransitionTime"] == "t3" and conds[0]["observedGeneration"] == 2
    assert conds[0]["type"] == "Running" and len(conds) == 1


def test_status_writes_are_typed_models_dumped_by_alias() -> None:
    """The operator builds JobStatus and sends exactly the fields it set, in camelCase; a field
    set to None goes as null (a merge patch clears it), a field never set is not sent."""
    status = st.status_from_child({}, st.ChildState(st.FAILED, "BackoffLimitExceeded", "pods failed", "t0"), 3, "t1")
    patch = st.status_patch(status)
    assert set(patch) == {"phase", "conditions", "startTime", "completionTime", "restarts"}
    assert patch["restarts"] is None  # none: sent as null, so a child made again clears the old list
    assert patch["phase"] == "Failed" and patch["completionTime"] == "t1"
    assert [c["type"] for c in patch["conditions"]] == [
        "ReferencesResolved",
        "Created",
        "Running",
        "Suspended",
        "Failed",
    ]
    assert set(patch["conditions"][0]) == {
        "type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"
    }  # fmt: skip
    assert JobStatus.model_validate(patch) == status  # what is sent parses back into the model
    status.child = None
    assert st.status_patch(status)["child"] is None


def _cond(type_: str, reason: str = "R", message: str = "M") -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "message": message}


@pytest.mark.parametrize(
    "job,phase,reason",
    [
        ({"status": {}}, st.PENDING, "Created"),
        ({"status": {"active": 1, "ready": 1}}, st.RUNNING, "Running"),
        ({"status": {"active": 1, "failed": 1}}, st.RESTARTING, "Restarting"),
        ({"spec": {"suspend": True}, "status": {}}, st.SUSPENDED, "Suspended"),
        ({"status": {"conditions": [_cond("Complete")]}}, st.SUCCEEDED, "Completed"),
        ({"status": {"succeeded": 1, "conditions": [_cond("SuccessCriteriaMet")]}}, st.SUCCEEDED, "Completed"),
        ({"status": {"conditions": [_cond("Failed", "BackoffLimitExceeded")]}}, st.FAILED, "BackoffLimitExceeded"),
        ({"status": {"conditions": [_cond("Failed", "DeadlineExceeded")]}}, st.FAILED, "DeadlineExceeded"),
        ({"status": {"conditions": [_cond("FailureTarget", "PodFailurePolicy")]}}, st.FAILED, "PodFailurePolicy"),
    ],
)
def test_batch_job_state(job: dict[str, Any], phase: str, reason: str) -> None:
    state = st.batch_job_state(job)
    assert (state.phase, state.reason) == (phase, reason)


@pytest.mark.parametrize(
    "conditions,phase",
    [
        ([_cond("Created")], st.PENDING),
        ([_cond("Created"), _cond("Running")], st.RUNNING),
        ([_cond("Created"), _cond("Restarting")], st.RESTARTING),
        ([_cond("Suspended")], st.SUSPENDED),
        ([_cond("Running"), _cond("Succeeded", "PyTorchJobSucceeded")], st.SUCCEEDED),
        ([_cond("Running"), _cond("Failed", "PyTorchJobFailed")], st.FAILED),
    ],
)
def test_pytorchjob_state(conditions: list[dict[str, Any]], phase: str) -> None:
    assert st.pytorchjob_state({"status": {"conditions": conditions}}).phase == phase


def test_pod_blockers() -> None:
    unschedulable = {
        "metadata": {"name": "p"},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ]
        },
    }
    assert st.pod_blocker(unschedulable) == (
        "Unschedulable",
        "pod p: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
    )
    pull = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}
            ]
        },
    }
    assert st.pod_blocker(pull) == ("ImagePullBackOff", "container trainer: no such image")
    assert st.pod_blocker({"metadata": {"name": "p"}, "status": {"phase": "Running"}}) is None


def test_status_from_child_pending_with_blocker_then_running_then_succeeded() -> None:
    pending = st.status_patch(
        st.status_from_child(
            {}, st.ChildState(st.PENDING, "Created", "waiting"), 1, "t1", ("Unschedulable", "no GPU node")
        )
    )
    assert pending["phase"] == st.PENDING
    running_cond = st.find_condition(pending["conditions"], st.COND_RUNNING)
    assert running_cond is not None and running_cond["reason"] == "Unschedulable"
    running = st.status_patch(st.status_from_child(pending, st.ChildState(st.RUNNING, "Running", "", "t2"), 1, "t2"))
    assert running["phase"] == st.RUNNING and running["startTime"] == "t2"
    done = st.status_patch(
        st.status_from_child({**pending, **running}, st.ChildState(st.SUCCEEDED, "Completed", "", "t2", "t3"), 1, "t3")
    )
    assert done["phase"] == st.SUCCEEDED and done["completionTime"] == "t3"
    succeeded = st.find_condition(done["conditions"], st.COND_SUCCEEDED)
    assert succeeded is not None and succeeded["status"] == "True"
    assert not st.changed({**pending, **running, **done}, done)


def test_failed_job_shows_the_trainers_reason() -> None:
    """The trainer's one-line reason (its termination message, copied by the kubelet into
    the container status) leads the Failed condition; the child's words follow."""
    pod = {
        "metadata": {"name": "j-automodel-x"},
        "status": {
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": 1,
                            "finishedAt": "t9",
                            "message": "warning first\n/data/rows.jsonl line 6: not valid JSON (Expecting value)\n",
                        }
                    },
                }
            ]
        },
    }
    found = st.pod_failure(pod)
    assert found is not None and found.failure_class == FailureClass.TRAINER_ERROR and found.time == "t9"
    assert found.message == "/data/rows.jsonl line 6: not valid JSON (Expecting value) (exit code 1)"
    assert st.pod_failure({"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 0}}}]}}) is None
    failed = st.status_patch(st.status_from_child(
        {}, st.ChildState(st.FAILED, "PodFailurePolicy", "exit code 1 matching FailJob rule"), 1, "t9",
        failures=[found],
    ))  # fmt: skip
    cond = st.find_condition(failed["conditions"], st.COND_FAILED)
    assert cond is not None and cond["reason"] == "TrainerError"
    assert cond["message"].startswith("/data/rows.jsonl line 6: not valid JSON"), cond["message"]
    assert cond["message"].endswith("exit code 1 matching FailJob rule")
    assert failed["restarts"] is None  # the failure that ended the job is no restart


def test_child_without_pods_shows_a_refused_creation() -> None:
    job = {"kind": "Job", "metadata": {"name": "j-automodel"}, "status": {}}
    assert not st.child_has_pods(job)
    assert st.child_has_pods({**job, "status": {"failed": 1}})
    torch = {"kind": "PyTorchJob", "status": {"replicaStatuses": {"Worker": {"active": 1, "selector": "x"}}}}
    assert st.child_has_pods(torch)
    events = [
        {"reason": "FailedCreate", "lastTimestamp": "t1", "message": "old"},
        {"reason": "FailedCreate", "lastTimestamp": "t2", "message": 'pods "x" is forbidden: exceeded quota'},
        {"reason": "SuccessfulCreate", "lastTimestamp": "t3", "message": "created"},
    ]
    assert st.creation_refusal(job, events) == (
        "PodCreationRefused",
        'Job j-automodel cannot create its pods: pods "x" is forbidden: exceeded quota',
    )
    assert st.creation_refusal(job, events[2:]) is None


def _world(**entities: Any) -> World:
    world = World()
    for key, spec in entities.items():
        ns, kind, name = key.split("__")
        world.entities[(kind, ns, name.replace("_", "-"))] = spec
    world.claims[("team-a", "models")] = "Bound"
    world.claims[("shared", "models")] = "Bound"
    return world


MODEL = {
    "storage": {"pvc": {"claimName": "models", "path": "m"}},
    "format": "full",
    "tokenizer": "tok-a",
    "vocabSize": 10,
}
DATA = {"storage": {"pvc": {"claimName": "models", "path": "d"}}}


def _automodel(**training: Any) -> AutomodelJobSpec:
    return AutomodelJobSpec.model_validate({"model": "base", "dataset": {"training": "data"}, "training": training})


def test_resolves_everything() -> None:
    world = _world(**{"team-a__Model__base": MODEL, "team-a__Fileset__data": DATA})
    res = resolve_references(_automodel(), "team-a", world.lookup)
    assert res.problems == [] and set(res.entities) == {"model", "training_data"}


def test_missing_reference_names_the_field() -> None:
    res = resolve_references(_automodel(), "team-a", _world(**{"team-a__Model__base": MODEL}).lookup)
    assert [(p.field, p.reason) for p in res.problems] == [("spec.dataset.training", "ReferenceNotFound")]


def test_cross_namespace_needs_consent() -> None:
    spec = AutomodelJobSpec.model_validate({"model": "shared/base", "dataset": {"training": "data"}})
    world = _world(**{"shared__Model__base": MODEL, "team-a__Fileset__data": DATA})
    res = resolve_references(spec, "team-a", world.lookup)
    assert [(p.field, p.reason) for p in res.problems] == [("spec.model", "ReferenceForbidden")]
    assert "sharedWith" in res.problems[0].message
    world = _world(**{"shared__Model__base": {**MODEL, "sharedWith": ["team-a"]}, "team-a__Fileset__data": DATA})
    assert resolve_references(spec, "team-a", world.lookup).problems == []


def test_teacher_must_be_full_weight_and_match() -> None:
    adapter = {**MODEL, "format": "adapter", "baseModel": "base"}
    world = _world(**{"team-a__Model__base": MODEL, "team-a__Fileset__data": DATA, "team-a__Model__teacher": adapter})
    res = resolve_references(_automodel(training_type="distillation", teacher_model="teacher"), "team-a", world.lookup)
    assert [p.reason for p in res.problems] == ["TeacherNotFullWeight"]
    other = {**MODEL, "tokenizer": "tok-b", "vocabSize": 11}
    world = _world(**{"team-a__Model__base": MODEL, "team-a__Fileset__data": DATA, "team-a__Model__teacher": other})
    res = resolve_references(_automodel(training_type="distillation", teacher_model="teacher"), "team-a", world.lookup)
    assert [p.reason for p in res.problems] == ["TokenizerMismatch", "VocabularyMismatch"]
    assert all(p.field == "spec.training.teacher_model" for p in res.problems)


def test_entity_not_ready_until_its_claim_binds() -> None:
    world = _world(
        **{"team-a__Model__base": {**MODEL, "storage": {"pvc": {"claimName": "new"}}}, "team-a__Fileset__data": DATA}
    )
    spec = UnslothJobSpec.model_validate({"model": {"name": "base"}, "dataset": {"path": "data"}})
    assert [p.reason for p in resolve_references(spec, "team-a", world.lookup).problems] == ["ClaimNotFound"]
    world.claims[("team-a", "new")] = "Pending"
    assert [p.reason for p in resolve_references(spec, "team-a", world.lookup).problems] == ["ClaimNotBound"]
    world.claims[("team-a", "new")] = "Bound"
    assert resolve_references(spec, "team-a", world.lookup).problems == []


def test_local_only_entity_is_not_usable_in_a_cluster() -> None:
    world = _world(
        **{"team-a__Model__base": {"storage": {"localPath": "/m"}, "format": "full"}, "team-a__Fileset__data": DATA}
    )
    res = resolve_references(_automodel(), "team-a", world.lookup)
    assert [p.reason for p in res.problems] == ["NoClusterStorage"]


def test_status_is_computed_whole_so_forged_fields_do_not_survive() -> None:
    """The trainer's identity may write status: a forged condition, time or phase must not
    be carried on by the operator's next write."""
    forged = {
        "phase": st.SUCCEEDED,
        "startTime": "1999-01-01T00:00:00Z",
        "completionTime": "1999-01-02T00:00:00Z",
        "conditions": [
            {"type": "Succeeded", "status": "True", "reason": "Forged", "message": "", "lastTransitionTime": "x"},
            {"type": "Running", "status": "True", "reason": "Running", "message": "", "lastTransitionTime": "t1"},
        ],
    }
    update = st.status_patch(
        st.status_from_child(forged, st.ChildState(st.RUNNING, "Running", "running", "t0"), 1, "t2")
    )
    assert update["phase"] == st.RUNNING and update["startTime"] == "t0" and update["completionTime"] is None
    types = [cond["type"] for cond in update["conditions"]]
    assert "Succeeded" not in types and types == ["ReferencesResolved", "Created", "Running", "Suspended"]
    running = st.find_condition(update["conditions"], st.COND_RUNNING)
    assert running is not None and running["lastTransitionTime"] == "t1"  # status did not move


def test_failed_child_completion_time_is_stable() -> None:
    """A failed batch Job has no completionTime: the Failed condition's own time is used,
    so two passes compute the same status and write once."""
    child = {
        "status": {
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "lastTransitionTime": "t9"}
            ]
        }
    }
    assert st.batch_job_state(child).completion_time == "t9"


def test_child_state_reads_either_kind() -> None:
    running = [{"type": "Running", "status": "True", "reason": "PyTorchJobRunning"}]
    assert st.child_state({"kind": "PyTorchJob", "status": {"conditions": running}}).phase == st.RUNNING
    assert st.child_state({"kind": "Job", "status": {"ready": 1}}).phase == st.RUNNING
    assert st.child_state({"kind": "Job", "spec": {"suspend": True}}).phase == st.SUSPENDED


def test_forget_job_empties_every_per_job_table() -> None:
    """PER_JOB_TABLES names tables the metrics expose, and forget_job drops a job's entry
    from each of them (a table added without both would grow with every job ever seen)."""
    from kubetune.controller.builders import OperatorSettings
    from kubetune.controller.reconciler import PER_JOB_TABLES, Reconciler

    reconciler = Reconciler(None, OperatorSettings(), lambda *_: None)  # type: ignore[arg-type]  # no requests
    tables = reconciler.tables()
    assert set(PER_JOB_TABLES) <= set(tables), set(PER_JOB_TABLES) - set(tables)
    key = ("AutomodelJob", "team-a", "gone")
    for name in PER_JOB_TABLES:
        table = tables[name]
        if isinstance(table, set):
            table.add(key)
        else:
            assert isinstance(table, dict), name
            table[key] = object()
    reconciler._retries.clear()  # a real entry is a task, which forget_job cancels
    reconciler.forget_job(key)
    left = [name for name in PER_JOB_TABLES if key in cast(Container[Any], tables[name])]
    assert not left, f"forget_job keeps {left}"


class _EventsLister:
    """Answers the one request _creation_refusal makes (a LIST of Events) and records it;
    no API server is needed for counting requests. The cluster tier's
    test_refused_pod_creation_is_shown runs the same code against a real one."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.calls: list[tuple[str, str | None]] = []

    async def list(self, path: str, label_selector: str | None = None, field_selector: str | None = None) -> Any:
        self.calls.append((path, field_selector))
        await asyncio.sleep(0)  # the other children ask while this LIST is in flight
        return {"items": self.events}


def test_pod_less_children_of_one_namespace_share_one_events_list() -> None:
    """Many children without pods in one namespace: one LIST of its FailedCreate Events
    serves them all (a field selector does not index Events, so a LIST per child cost the
    API server the whole namespace's Events once per child), and each child still gets its
    own refusal, matched by uid."""
    from kubetune.controller.builders import OperatorSettings
    from kubetune.controller.reconciler import Reconciler

    def refused(uid: str) -> dict[str, Any]:
        return {
            "reason": "FailedCreate",
            "lastTimestamp": "t1",
            "involvedObject": {"uid": uid},
            "message": f"quota refused {uid}",
        }

    lister = _EventsLister([refused("u0"), refused("u2")])
    reconciler = Reconciler(lister, OperatorSettings(), lambda *_: None)  # type: ignore[arg-type]
    children = {f"j{i}": {"kind": "Job", "metadata": {"name": f"j{i}-automodel", "uid": f"u{i}"}} for i in range(4)}

    async def check_all() -> list[tuple[str, str] | None]:
        found = await asyncio.gather(
            *(reconciler._creation_refusal(("AutomodelJob", "team-a", name), child) for name, child in children.items())
        )
        for task in reconciler._retries.values():
            task.cancel()
        return list(found)

    found = asyncio.run(check_all())
    assert lister.calls == [("/api/v1/namespaces/team-a/events", "reason=FailedCreate")]
    assert [f and f[1] for f in found] == [
        "Job j0-automodel cannot create its pods: quota refused u0",
        None,
        "Job j2-automodel cannot create its pods: quota refused u2",
        None,
    ]


def _pod(status: dict[str, Any], name: str = "j-automodel-0") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-{name}"}, "status": status}


def _terminated(code: int, reason: str = "Error", message: str = "", at: str = "t5") -> dict[str, Any]:
    done = {"exitCode": code, "reason": reason, "finishedAt": at, "message": message}
    return {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": done}}]}


def _disrupted(reason: str) -> dict[str, Any]:
    cond = {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "m", "lastTransitionTime": "t4"}
    return {"phase": "Running", "conditions": [cond]}


@pytest.mark.parametrize(
    ("status", "failure_class", "words"),
    [
        (_terminated(137, "OOMKilled"), FailureClass.OUT_OF_MEMORY, "ran out of memory (OOMKilled, exit code 137)"),
        (_terminated(143, message="preempted: checkpoint saved at step 40"), FailureClass.PREEMPTED, "step 40"),
        (_terminated(137), FailureClass.PREEMPTED, "stopped by a signal (exit code 137)"),
        (_terminated(1, message="bad row"), FailureClass.TRAINER_ERROR, "bad row (exit code 1)"),
        (_terminated(2), FailureClass.TRAINER_ERROR, "exited with code 2"),
        (_disrupted("PreemptionByScheduler"), FailureClass.PREEMPTED, "PreemptionByScheduler: m"),
        (_disrupted("EvictionByEvictionAPI"), FailureClass.PREEMPTED, "EvictionByEvictionAPI"),
        (_disrupted("DeletionByTaintManager"), FailureClass.NODE_FAILURE, "DeletionByTaintManager"),
        (_disrupted("DeletionByPodGC"), FailureClass.NODE_FAILURE, "DeletionByPodGC"),
        ({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}, FailureClass.PREEMPTED, "low on"),
        ({"phase": "Failed", "reason": "NodeLost", "message": "node gone"}, FailureClass.NODE_FAILURE, "node gone"),
    ],
)
def test_each_failure_class_from_the_pod(status: dict[str, Any], failure_class: FailureClass, words: str) -> None:
    found = st.pod_failure(_pod(status))
    assert found is not None and found.failure_class == failure_class and words in found.message, found


def test_a_running_waiting_or_succeeded_pod_is_no_failure() -> None:
    assert st.pod_failure(_pod({"phase": "Running"})) is None
    waiting = {"containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff"}}}]}
    assert st.pod_failure(_pod(waiting)) is None  # a blocker (pod_blocker), not a failure
    assert st.pod_failure(_pod(_terminated(0, "Completed"))) is None


def test_restarts_list_every_failure_but_the_one_that_ended_the_job() -> None:
    preempted = st.PodFailure(FailureClass.PREEMPTED, "t1", "p0", "PreemptionByScheduler: m", step=40)
    oom = st.PodFailure(FailureClass.OUT_OF_MEMORY, "t2", "p1", "the container ran out of memory", step=55)
    running = st.ChildState(st.RUNNING, "Running", "the trainer pod is running", "t0")
    status = st.status_patch(st.status_from_child({}, running, 1, "t3", failures=[oom, preempted]))
    assert [(r["failureClass"], r["pod"], r["step"]) for r in status["restarts"]] == [
        ("Preempted", "p0", 40),
        ("OutOfMemory", "p1", 55),
    ]
    ended = st.ChildState(st.FAILED, "BackoffLimitExceeded", "Job has reached the specified backoff limit", "t0")
    status = st.status_patch(
        st.status_from_child({}, ended, 1, "t3", failures=[oom, preempted], out_of_memory_hint="lower the batch")
    )
    cond = st.find_condition(status["conditions"], st.COND_FAILED)
    assert cond is not None and cond["reason"] == "OutOfMemory"
    assert (
        cond["message"].startswith("the container ran out of memory; Job has reached")
        and "lower the batch" in cond["message"]
    )
    assert [r["pod"] for r in status["restarts"]] == ["p0"]
    # A deadline stops the pods itself: its reason stands, and every pod failure is listed.
    deadline = st.ChildState(st.FAILED, "DeadlineExceeded", "Job was active longer than specified deadline", "t0")
    status = st.status_patch(st.status_from_child({}, deadline, 1, "t3", failures=[preempted]))
    cond = st.find_condition(status["conditions"], st.COND_FAILED)
    assert cond is not None and cond["reason"] == "DeadlineExceeded" and len(status["restarts"]) == 1


def test_restarts_listed_in_status_survive_an_operator_restart() -> None:
    """A pod deleted while the operator was down is seen by nobody again: its entry in
    status is carried. A failure seen again keeps the step listed when it was first seen
    (the trainer has gone on since). Entries that are not valid Restarts are dropped."""
    listed: list[dict[str, Any]] = [
        {"failureClass": "Preempted", "time": "t1", "pod": "gone", "message": "EvictionByEvictionAPI: m", "step": 40},
        {"failureClass": "OutOfMemory", "time": "t2", "pod": "p1", "message": "oom", "step": 55},
        {"failureClass": "NotAClass", "time": "t3", "pod": "forged"},
    ]
    seen = st.PodFailure(FailureClass.OUT_OF_MEMORY, "t2", "p1", "oom", step=70)
    carried = st.with_listed_restarts([seen], listed)
    assert [(f.pod, f.failure_class, f.step) for f in carried] == [
        ("p1", FailureClass.OUT_OF_MEMORY, 55),
        ("gone", FailureClass.PREEMPTED, 40),
    ]
    assert st.with_listed_restarts([seen], None) == [seen]


def test_out_of_retries_counts_disruptions_and_other_failures_apart() -> None:
    def failures(*classes: FailureClass) -> list[st.PodFailure]:
        return [st.PodFailure(kind, f"t{i}", f"p{i}", "m") for i, kind in enumerate(classes)]

    preempted, lost, oom = FailureClass.PREEMPTED, FailureClass.NODE_FAILURE, FailureClass.OUT_OF_MEMORY
    assert st.out_of_retries(failures(preempted, lost, oom, oom), disruptions=2, others=2) is None
    why = st.out_of_retries(failures(preempted, lost, preempted, oom), disruptions=2, others=2)
    assert why == "3 pods were preempted or lost their node, more than spec.retries.disruptions (2)"
    why = st.out_of_retries(failures(oom, preempted, oom), disruptions=2, others=1)
    assert why is not None and "more than spec.retries.failures (1)" in why
    assert st.out_of_retries([], disruptions=0, others=0) is None


def test_a_child_the_operator_stopped_has_failed_with_its_reason() -> None:
    """A stopped child (annotations by builders.stop_patch) is Failed from that moment, with
    the operator's words, even while its controller still reports it running; the job's
    Failed reason is then the class of the failure that used the budget up."""
    annotations = {"kubetune.io/stopped": "2 pods were preempted", "kubetune.io/stopped-at": "t5"}
    running = {"kind": "Job", "metadata": {"annotations": annotations}, "status": {"ready": 1, "startTime": "t0"}}
    state = st.child_state(running)
    assert (state.phase, state.reason, state.message, state.completion_time) == (
        st.FAILED,
        "RetriesExhausted",
        "2 pods were preempted",
        "t5",
    )
    assert st.stopped_at(running) == "t5" and st.stopped_at({"kind": "Job"}) is None
    succeeded = {**running, "status": {"conditions": [_cond("Complete", "Completed")]}}
    assert st.child_state(succeeded).phase == st.SUCCEEDED  # done before the stop took: it stands
    last = st.PodFailure(FailureClass.PREEMPTED, "t4", "p2", "EvictionByEvictionAPI: m")
    status = st.status_patch(st.status_from_child({}, state, 1, "t6", failures=[last]))
    cond = st.find_condition(status["conditions"], st.COND_FAILED)
    assert cond is not None and cond["reason"] == "Preempted"
    assert cond["message"] == "EvictionByEvictionAPI: m; 2 pods were preempted"


def test_a_trainer_is_stalled_after_ten_steps_or_five_minutes_without_a_report() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def ago(seconds: float) -> str:
        return (now - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")

    # 4 minutes quiet, 2 s per step: under the 5-minute floor, looked at again in a minute.
    why, due = st.stall({"step": 7, "updatedAt": ago(240), "secondsPerStep": 2.0}, None, now)
    assert why is None and due == 60
    why, due = st.stall({"step": 7, "updatedAt": ago(301), "secondsPerStep": 2.0}, None, now)
    assert due is None and why is not None and why.startswith("no progress report since step 7, 5m01s ago")
    # Slow steps stretch the limit: 10 × 60 s.
    assert st.stall({"step": 7, "updatedAt": ago(590), "secondsPerStep": 60.0}, None, now)[0] is None
    assert st.stall({"step": 7, "updatedAt": ago(601), "secondsPerStep": 60.0}, None, now)[0] is not None
    # The job's own timeout wins, shorter or longer.
    assert st.stall({"step": 7, "updatedAt": ago(120)}, 100, now)[0] is not None
    assert st.stall({"step": 7, "updatedAt": ago(4000)}, 7200, now)[0] is None
    # Not judged before the first report (loading a model) or on a malformed time.
    assert st.stall(None, None, now) == (None, None)
    assert st.stall({"updatedAt": "yesterday"}, None, now) == (None, None)


def test_the_stalled_condition_shows_only_on_a_running_job() -> None:
    running = st.ChildState(st.RUNNING, "Running", "the trainer pod is running", "t0")
    status = st.status_patch(st.status_from_child({}, running, 1, "t1", stalled="no progress report since step 7"))
    cond = st.find_condition(status["conditions"], st.COND_STALLED)
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "NoProgress"
    done = st.ChildState(st.SUCCEEDED, "Completed", "done", "t0", "t2")
    status = st.status_patch(st.status_from_child({}, done, 1, "t3", stalled="no progress report since step 7"))
    assert st.find_condition(status["conditions"], st.COND_STALLED) is None


def test_a_stall_restart_evicts_only_the_pods_that_were_there_at_the_last_report() -> None:
    def pod(name: str, started: str | None, phase: str = "Running", **meta: str) -> dict[str, Any]:
        status: dict[str, Any] = {"phase": phase}
        if started:
            status["startTime"] = started
        return {"metadata": {"name": name, "creationTimestamp": "2026-12-02T05:00:00Z", **meta}, "status": status}

    pods = [
        pod("worker-1", "2026-12-02T06:00:00Z"),
        pod("master-0", "2026-12-02T05:59:00Z"),
        pod("replacement", "2026-12-02T06:10:00Z"),  # made after the report: still loading
        pod("scheduled", None, "Pending"),  # no start yet: judged by its creation
        pod("leaving", "2026-12-02T06:00:00Z", deletionTimestamp="2026-12-02T06:11:00Z"),
        pod("done", "2026-12-02T06:00:00Z", "Failed"),
    ]
    assert st.stalled_pods(pods, "2026-12-02T06:05:00Z") == ["master-0", "scheduled", "worker-1"]
