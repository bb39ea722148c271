"""Views that enqueue the site's tasks through Django's task framework, as a project's own would."""

from django.db import transaction
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from . import tasks

try:
    from django.tasks import task_backends
except ImportError:
    from django_tasks import task_backends


@csrf_exempt
def enqueue(request):
    n = int(request.GET.get("n", "1"))
    return JsonResponse({"ids": [tasks.count_users.enqueue().id for _ in range(n)]})


@csrf_exempt
def in_transaction(request):
    """Enqueue in Django's transaction (the "tx" backend writes the task in it), then commit or roll back."""
    task = tasks.calculate_meaning_of_life.using(backend="tx")
    try:
        with transaction.atomic():
            result = task.enqueue()
            if request.GET.get("rollback"):
                raise RuntimeError("rolled back on purpose")
    except RuntimeError:
        pass
    return JsonResponse({"id": result.id})


def result(request, result_id):
    from greenqueue.django import TaskResultDoesNotExist
    try:
        found = task_backends[request.GET.get("backend", "default")].get_result(result_id)
    except TaskResultDoesNotExist:
        return JsonResponse({"status": None}, status=404)
    return JsonResponse({"status": str(found.status),
                         "return_value": found.return_value if found.status == "SUCCESSFUL" else None})
