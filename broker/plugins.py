"""amqtt plugins of the embedded broker: authentication and topic ACL backed by :class:`BrokerPolicy`.

The broker's plugin map lists exactly these two (replacing amqtt's defaults on purpose: no
anonymous access, no $SYS, no amqtt ACL, whose wildcard check escalates). The CONNECT gate in
:mod:`broker.framing` has already checked credentials; the auth plugin checks them again
(cheaply, see :mod:`broker.policy`) because amqtt refuses a CONNECT no plugin vouches for and a
second, independent check costs nothing. :class:`HardenedBroker` hands both plugins the policy
right after amqtt builds them; until then they refuse everything.
"""

from __future__ import annotations

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker.policy import BrokerPolicy


class SealmqAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.policy: BrokerPolicy | None = None

    async def authenticate(self, *, session: Session) -> bool | None:
        if self.policy is None:
            return False
        return await self.policy.check_plugin(session.username, session.password)


class SealmqAclPlugin(BaseTopicPlugin):  # type: ignore[misc]
    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.policy: BrokerPolicy | None = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if self.policy is None or session is None or not topic:
            return False
        name = session.username
        if action == Action.PUBLISH:
            return self.policy.may_publish(name, topic)
        if action == Action.SUBSCRIBE:
            return self.policy.may_subscribe(name, topic)
        if action == Action.RECEIVE:
            return self.policy.may_receive(name, topic)
        return False
