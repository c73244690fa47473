"""Job entry points, named in core/jobs.py by dotted path.

The conversion itself (decode once, write every variant of the profile) is the subject of the
conversion-workers issue; until then a job confirms the original is readable and leaves the
image in `processing`.
"""

from __future__ import annotations

import logging
import os

from core.models import original_key
from core.records import Records, connect
from core.settings import Settings
from core.storage import Store

log = logging.getLogger(__name__)


def convert(owner: str, image_id: str) -> None:
    settings = Settings.from_env(os.environ)
    records = Records(connect(settings))
    record = records.get(owner, image_id)
    info = Store.from_settings(settings).stat(original_key(owner, image_id))
    log.info(
        "original %s/%s is %d bytes (%s); variants not built yet",
        owner,
        image_id,
        info.size,
        record.format,
    )
