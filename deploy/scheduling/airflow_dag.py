"""Airflow DAG: `semjpeg nightly` every night for the DAG run's date.

The task runs on a worker with semjpeg installed (`pip install "semjpeg[gcp]"`); with
`runner: DataflowRunner` in the config it submits the Dataflow job, waits for it, then writes the
history partition and the report. Exit status 3 (an alarm: a regression, a missing pair or a
night without results) fails the task, which alerts.
"""
from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

with DAG(
    dag_id="semjpeg_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=30)},
    tags=["semjpeg"],
) as dag:
    BashOperator(
        task_id="nightly",
        bash_command="semjpeg nightly --config gs://my-bucket/config/nightly.yaml --date {{ ds }}",
        execution_timeout=timedelta(hours=8),
    )
