"""URL map: every endpoint answers JSON."""

from __future__ import annotations

from django.urls import path, re_path

from reports import views

urlpatterns = [
    re_path(r"^reports/?$", views.create_report, name="report-create"),
    path("reports/<uuid:report_id>/", views.report_detail, name="report-detail"),
    path("healthz", views.healthz, name="healthz"),
    path("slow", views.slow, name="slow"),
    path("tasks/summary", views.tasks_summary, name="tasks-summary"),
]
