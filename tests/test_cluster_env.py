"""`kava env` reads SLURM, PBS/Torque, SGE and LSF jobs from their environment variables."""

import pytest

from kava.training.env import environment_report, expand_hostlist, format_report, scheduler_job


def test_expand_hostlist():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("node[8-10]-ib") == ["node8-ib", "node9-ib", "node10-ib"]
    assert expand_hostlist("single") == ["single"] and expand_hostlist("") == []


def test_slurm():
    job = scheduler_job(
        {
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "kava",
            "SLURM_JOB_PARTITION": "gpu",
            "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NTASKS": "8",
            "SLURM_PROCID": "5",
            "SLURM_JOB_GPUS": "0,1,2,3",
            "SLURM_ARRAY_TASK_ID": "3",
        }
    )
    assert job == {
        "scheduler": "SLURM",
        "job_id": "4242",
        "job_name": "kava",
        "queue": "gpu",
        "array_index": "3",
        "hosts": ["gpu01", "gpu02"],
        "nodes": 2,
        "slots": 8,
        "rank": 5,
        "gpus": "0,1,2,3",
    }


def test_pbs_torque(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n01\nn01\nn02\nn02\n")
    gpufile = tmp_path / "gpus"
    gpufile.write_text("n01-gpu0\nn02-gpu0\n")
    job = scheduler_job(
        {
            "PBS_JOBID": "123.server",
            "PBS_JOBNAME": "run",
            "PBS_QUEUE": "gpuq",
            "PBS_NODEFILE": str(nodefile),
            "PBS_GPUFILE": str(gpufile),
            "PBS_NUM_NODES": "2",
            "PBS_ARRAYID": "7",
            "PBS_VNODENUM": "1",
        }
    )
    assert job == {
        "scheduler": "PBS",
        "job_id": "123.server",
        "job_name": "run",
        "queue": "gpuq",
        "array_index": "7",
        "hosts": ["n01", "n02"],
        "nodes": 2,
        "slots": 4,
        "rank": 1,
        "gpus": "n01-gpu0,n02-gpu0",
    }
    pro = scheduler_job({"PBS_JOBID": "9[2].pbs", "PBS_ARRAY_INDEX": "2", "NCPUS": "16", "CUDA_VISIBLE_DEVICES": "0"})
    assert (pro["array_index"], pro["slots"], pro["hosts"], pro["nodes"], pro["gpus"]) == ("2", 16, [], None, "0")


def test_sge(tmp_path):
    hostfile = tmp_path / "pe_hostfile"
    hostfile.write_text("c1.cluster 4 all.q@c1 UNDEFINED\nc2.cluster 4 all.q@c2 UNDEFINED\n")
    env = {
        "JOB_ID": "77",
        "JOB_NAME": "kava",
        "QUEUE": "all.q",
        "SGE_ROOT": "/opt/sge",
        "SGE_TASK_ID": "undefined",
        "PE_HOSTFILE": str(hostfile),
        "NHOSTS": "2",
        "NSLOTS": "8",
        "SGE_HGR_gpu": "gpu0 gpu1",
    }
    assert scheduler_job(env) == {
        "scheduler": "SGE",
        "job_id": "77",
        "job_name": "kava",
        "queue": "all.q",
        "array_index": None,
        "hosts": ["c1.cluster", "c2.cluster"],
        "nodes": 2,
        "slots": 8,
        "rank": None,
        "gpus": "gpu0 gpu1",
    }
    assert scheduler_job({"JOB_ID": "77"}) is None  # JOB_ID alone is no Grid Engine job


def test_lsf():
    job = scheduler_job(
        {
            "LSB_JOBID": "555",
            "LSB_JOBNAME": "kava[3]",
            "LSB_QUEUE": "normal",
            "LSB_JOBINDEX": "3",
            "LSB_MCPU_HOSTS": "hA 4 hB 4",
            "LSB_HOSTS": "hA hA hA hA hB hB hB hB",
            "CUDA_VISIBLE_DEVICES": "0,1",
        }
    )
    assert job == {
        "scheduler": "LSF",
        "job_id": "555",
        "job_name": "kava[3]",
        "queue": "normal",
        "array_index": "3",
        "hosts": ["hA", "hB"],
        "nodes": 2,
        "slots": 8,
        "rank": None,
        "gpus": "0,1",
    }
    assert scheduler_job({"LSB_JOBID": "1", "LSB_HOSTS": "x x", "LSB_JOBINDEX": "0"})["slots"] == 2


def test_no_job_outside_a_scheduler():
    assert scheduler_job({"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0"}) is None


@pytest.mark.parametrize(
    "env,shown",
    [
        ({"LSB_JOBID": "555", "LSB_MCPU_HOSTS": "hA 4 hB 4"}, "LSF job 555, 2 node(s): hA, hB, 8 slot(s)"),
        (
            {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "g[1-2]", "SLURM_NTASKS": "2"},
            "SLURM job 9, 2 node(s): g1, g2, 2 slot(s)",
        ),
    ],
)
def test_kava_env_prints_the_job(monkeypatch, env, shown):
    for name in ("SLURM_JOB_ID", "PBS_JOBID", "JOB_ID", "LSB_JOBID", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    report = environment_report()
    assert report["distributed"]["job"]["scheduler"] in ("LSF", "SLURM")
    assert f"job           {shown}" in format_report(report).splitlines()
