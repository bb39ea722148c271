"""ThumbnailApp: Pillow in worker processes, so image work never slows page views.

Concurrency model: each worker process imports Pillow once (``init``) and
handles one image at a time; the web process only waits in the greenlet that
asked.
"""

import os

from greenqueue import DirtyApp


class ThumbnailApp(DirtyApp):
    """Makes JPEG thumbnails of uploaded images."""

    workers = 1
    timeout = 30

    def init(self):
        """Import Pillow once per worker."""
        from PIL import Image
        self.Image = Image

    def thumbnail(self, src, dst, size=128):
        """Write a thumbnail of ``src`` no larger than ``size`` px to ``dst``; returns (width, height)."""
        with self.Image.open(src) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            tmp = dst + ".part"
            img.save(tmp, "JPEG", quality=85)
            os.replace(tmp, dst)  # readers never see half a file
            return img.size
