"""The review gallery: designers and marketers review what a run produced, pick A/B variants, export, audit.

``adforge gallery`` serves :func:`review.app.create_app`. The folder imports ``storage`` only (never ``engine`` or
``flows``): "re-render with these settings" therefore only queues a row in ``rerender_queue`` (status ``queued``,
the variant's full settings copied into ``settings``); rendering it is a worker's job.

Modules: ``app`` (factory, error pages), ``config`` (limits), ``middleware`` (body caps, the sign-in gate, security
headers, access log), ``pages`` / ``api`` (routes), ``ids`` (ids in URLs), ``security`` (who is asking, roles,
CSRF), ``sessions`` (server-side sessions), ``signin`` (sign-in limits), ``auth`` (users, argon2), ``queries``
(read models), ``actions`` (audited changes), ``thumbs`` / ``files`` (images), ``export``, ``results`` + ``stats``
(A/B), ``audit_export``.
"""
