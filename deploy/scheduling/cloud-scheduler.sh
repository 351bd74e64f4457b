#!/usr/bin/env bash
# Cloud Scheduler launches the Flex Template every night at 02:00 UTC (the night is the launch's
# UTC date; alarms: the semjpeg:nightly_alarms counter in Cloud Monitoring, see deploy/README.md).
set -euo pipefail
PROJECT=my-project
REGION=us-central1
TEMPLATE=gs://my-bucket/templates/semjpeg-nightly.json
CONFIG=gs://my-bucket/config/nightly.yaml

gcloud scheduler jobs create http semjpeg-nightly \
  --project="$PROJECT" --location="$REGION" --schedule="0 2 * * *" --time-zone="Etc/UTC" \
  --uri="https://dataflow.googleapis.com/v1b3/projects/$PROJECT/locations/$REGION/flexTemplates:launch" \
  --http-method=POST --headers=Content-Type=application/json \
  --oauth-service-account-email="semjpeg-scheduler@$PROJECT.iam.gserviceaccount.com" \
  --message-body="{\"launchParameter\": {\"jobName\": \"semjpeg-nightly\", \"containerSpecGcsPath\": \"$TEMPLATE\", \"parameters\": {\"job\": \"nightly\", \"config\": \"$CONFIG\"}}}"
