"""The archive of the change streams: segments in the snapshot store, read only by restores.

``segment`` is the format (pure), ``catalog`` lists and judges what a store holds, ``writer``
keeps the archive on the snapshot leader, ``cut`` and ``pitr`` restore a database to a point in
time, ``verify`` proves an archive continuous.
"""
