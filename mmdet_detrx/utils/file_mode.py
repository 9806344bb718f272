"""The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
import os

__all__ = ['current_umask']


def current_umask() -> int:
    """The umask, from ``/proc/self/status`` (Linux >= 4.7), else by a set-and-restore."""
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
