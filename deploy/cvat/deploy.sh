#!/usr/bin/env bash
# Deploy the sam2flow SAM2 functions to the nuclio of a self-hosted CVAT, the way CVAT's own
# serverless/deploy_cpu.sh deploys its functions (project "cvat", local platform, CVAT's network;
# read in cvat-ai/cvat at 5229a57d12d1).
#
#   deploy/cvat/deploy.sh                                   # all three: clicks, box first, detector
#   deploy/cvat/deploy.sh deploy/cvat/sam2/function.yaml    # only some
#
# Environment: SAM2FLOW_VERSION (hiera_tiny), SAM2FLOW_FAMILY (sam2.1), TORCH_INDEX (CPU wheels),
# CVAT_NETWORK (cvat_cvat, the network of CVAT's docker compose).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"

docker build -f "$HERE/Dockerfile" -t sam2flow-cvat:latest \
    --build-arg SAM2FLOW_VERSION="${SAM2FLOW_VERSION:-hiera_tiny}" \
    --build-arg SAM2FLOW_FAMILY="${SAM2FLOW_FAMILY:-sam2.1}" \
    --build-arg TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" \
    "$ROOT"

nuctl create project cvat --platform local || true  # fails when it exists already

if [ "$#" -gt 0 ]; then configs=("$@"); else configs=("$HERE"/sam2/function*.yaml); fi
for config in "${configs[@]}"; do
    echo "Deploying $config ..."
    nuctl deploy --project-name cvat --path "$HERE/sam2" --file "$config" --platform local \
        --platform-config "{\"attributes\": {\"network\": \"${CVAT_NETWORK:-cvat_cvat}\"}}"
done

nuctl get function --platform local
