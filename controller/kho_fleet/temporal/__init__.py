"""The Temporal engine: rollouts as durable workflows, host steps as activities run by one
worker deployment per site (task queue `kho-fleet-<site>`).

It drives the same step table (lifecycle.py) through the same per-step code (hoststeps.py)
as the embedded engine, judges gates with rollout.judge_gate, and its fleet report is built
by fleetreport.py from the workflow's rows (state.Snapshot), so both engines' reports share
code and schema. Needs the `kho-fleet[temporal]` extra (temporalio); `state` does not.

    workflow.py   RolloutWorkflow (stages, gates, failure policy, abort signal, status
                  query) and HostBatchWorkflow (up to `batch_size` hosts' lifecycles)
    activities.py the host-phase activity: a phase's steps on a few hosts (HostSteps)
    state.py      pure: host rows and their transitions (statedb's machine), Snapshot
    client.py     start / attach / status / abort / report from the CLI
    worker.py     `kho-fleet worker --site NAME`
"""
