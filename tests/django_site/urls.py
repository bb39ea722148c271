"""No views yet: the backend tests drive tasks directly."""

urlpatterns: list = []
