"""nuclio entry points of the sam2flow CVAT functions (``handler: main:handler`` in the function.yaml files).

Everything happens in ``sam2flow.integrations.cvat``; the environment set in the function.yaml
(``SAM2FLOW_CVAT_KIND`` and the ``SAM2FLOW_*`` model settings) decides what this worker serves.
"""

from sam2flow.integrations import cvat


def init_context(context):
    cvat.init_context(context)


def handler(context, event):
    return cvat.handler(context, event)
