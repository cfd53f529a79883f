"""The admin web app served by `cxrnode serve` on HTTP_PORT.

- :mod:`.app` builds the FastAPI application (health, metrics, API, dashboard);
- :mod:`.server` runs it in the node's ``web`` child process (uvicorn, no idle tick);
- :mod:`.auth` who is asking (:func:`.auth.current_principal` returns the request's
  principal: name and role), the role each route declares, sessions and CSRF checks;
- :mod:`.accounts` roles, local accounts and service-account tokens; :mod:`.directory` LDAP
  logins; :mod:`.trail` the web app's audit records (:mod:`cxrnode.audit`);
- :mod:`.health` the liveness and readiness checks;
- :mod:`.metrics` the Prometheus metrics (listener instruments, scrape-time gauges, stage
  latencies from the job history);
- :mod:`.studies` the study list and study detail (typed), shared by API and dashboard;
- :mod:`.api` the JSON API under ``/api/v1``; :mod:`.dashboard` the HTML pages;
- :mod:`.agreement` the place where the model-agreement panel's data is wired in.

Importing this package imports nothing heavy: the listener processes import :mod:`.metrics`
alone.
"""
